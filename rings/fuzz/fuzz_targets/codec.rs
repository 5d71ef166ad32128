//! Any bytes, with any fd count, must decode to a value or an error:
//! never a panic. Whatever decodes must re-encode to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use ssock_rings::codec::{Request, Response};

fuzz_target!(|data: &[u8]| {
    let Some((&fds, frame)) = data.split_first() else { return };
    let fds = usize::from(fds % 5);
    if let Ok(r) = Request::decode(frame, fds) {
        assert_eq!(r.encode(), frame);
    }
    if let Ok(r) = Response::decode(frame, fds) {
        assert_eq!(r.encode(), frame);
    }
});
