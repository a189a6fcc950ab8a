//! Job-spec parsing (`meridian_spec::job::JobSpec::from_toml`): any text is either a
//! valid spec or a `SpecError`, never a panic; a valid spec's canonical JSON
//! (what sites receive and bind their approval to) parses back to the same
//! spec hash.

#![no_main]

use libfuzzer_sys::fuzz_target;
use meridian_spec::job::JobSpec;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match JobSpec::from_toml(text, "fuzz.toml") {
        Ok(spec) => {
            let json = spec.canonical_json();
            let back = JobSpec::from_canonical_json(&json).expect("the canonical JSON of a valid spec parses");
            assert_eq!(back.hash(), spec.hash());
            assert_eq!(back.canonical_json(), json);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
