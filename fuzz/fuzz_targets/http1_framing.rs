//! The HTTP/1.1 framing guard (waypoint/framing.rs): request smuggling
//! shapes in a tunnel's bytes. However the bytes are split across reads,
//! the verdicts are the same. Input: first byte the read size (1..=256),
//! the rest the tunnel's bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shunt_agent::fuzzing::framing_verdicts;

fuzz_target!(|data: &[u8]| {
    let Some((&size, bytes)) = data.split_first() else {
        return;
    };
    let whole = framing_verdicts(&[bytes]);
    let chunks: Vec<&[u8]> = bytes.chunks(size as usize + 1).collect();
    assert_eq!(
        framing_verdicts(&chunks),
        whole,
        "split every {} bytes",
        size as usize + 1
    );
    let bytewise: Vec<&[u8]> = bytes.chunks(1).collect();
    assert_eq!(framing_verdicts(&bytewise), whole, "split every byte");
});
