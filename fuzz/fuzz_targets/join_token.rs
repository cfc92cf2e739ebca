//! Join tokens as `hubmesh up --join` reads them: garbage is refused, a token round-trips.
#![no_main]

use hubmesh_consensus::join::JoinToken;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(token) = JoinToken::parse(text) {
        assert_eq!(JoinToken::parse(&token.to_string()).expect("a printed token parses"), token);
    }
});
