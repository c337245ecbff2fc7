//! The batch splitter (JSON array or NDJSON): never panics, never returns
//! more than the item cap, and every item is a sub-slice of the input.
#![no_main]
use libfuzzer_sys::fuzz_target;
use switchyard::batch;

fuzz_target!(|data: &[u8]| {
    if let Ok(items) = batch::split(data) {
        assert!(items.len() <= batch::MAX_ITEMS + 1);
        let range = data.as_ptr_range();
        for item in items {
            assert!(!item.is_empty());
            assert!(range.contains(&item.as_ptr()));
        }
    }
});
