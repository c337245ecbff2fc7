# Sourced by the scripts: installs Debian packages the tests need when their
# commands are missing (CI machines start with only Rust, Python and Node).
#
#   ensure_commands PACKAGE:COMMAND ...
#
# Runs `apt-get update` once, then `apt-get install -y` for whatever is
# missing (as root, or through sudo when it is there).
ensure_commands() {
  local missing=()
  for spec in "$@"; do
    command -v "${spec#*:}" >/dev/null 2>&1 || missing+=("${spec%%:*}")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  local sudo=""
  [[ "$(id -u)" -ne 0 ]] && sudo="sudo"
  echo "installing ${missing[*]}" >&2
  if [[ -z "${SWITCHYARD_APT_UPDATED:-}" ]]; then
    $sudo apt-get update -qq
    export SWITCHYARD_APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}
