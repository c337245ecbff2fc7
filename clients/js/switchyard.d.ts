// Types for switchyard.js (contract §12).

export interface Welcome {
  type: "welcome";
  user: string;
  conn: string;
  epoch: string;
  seq: number;
  /** Present when the connection asked to resume: false means events may be missing. */
  recovered?: boolean;
  ping_ms: number;
}

export interface SwitchyardEvent {
  seq: number;
  event: string;
  data: unknown;
  priority: "high" | "normal" | "low";
  /** Broker publish time, unix ms. */
  ts: number;
}

export type State = "connecting" | "open" | "reconnecting" | "closed";

export interface ConnectOptions {
  /** A client token (JWT mode). */
  token?: string;
  /** Called before every (re)connect; its token is used for that attempt. */
  getToken?: () => string | Promise<string>;
  /** Dev mode only, instead of a token. */
  user?: string;
  /** Reconnect backoff bounds (full jitter between them), default 250 and 15000. */
  minDelayMs?: number;
  maxDelayMs?: number;
  /** App ping interval; no pong within it means the socket is dead. Default 15000. */
  pingIntervalMs?: number;
  /** In order of preference; default ["websocket", "sse"]. */
  transports?: Array<"websocket" | "sse">;
  /** WebSocket attempts failing in a row before falling back to SSE; default 2. */
  fallbackAfter?: number;
}

export interface Connection {
  on(name: "open", fn: (welcome: Welcome) => void): Connection;
  on(name: "event", fn: (ev: SwitchyardEvent) => void): Connection;
  on(name: "resync", fn: (welcome: Welcome) => void): Connection;
  on(name: "state", fn: (state: State) => void): Connection;
  on(name: "error", fn: (err: unknown) => void): Connection;
  /** What the next resume asks for. */
  readonly lastSeq: number | null;
  readonly epoch: string | null;
  readonly state: State;
  /** The transport in use: "websocket", or "sse" after a fallback. */
  readonly transport: "websocket" | "sse";
  /** Connection attempts made so far. */
  readonly attempts: number;
  /** Closes for good: no reconnect after this. */
  close(): void;
}

/** Opens a logical connection to ws(s)://host/ws that reconnects and resumes by itself. */
export function connect(url: string, options?: ConnectOptions): Connection;
