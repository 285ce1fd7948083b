//! Policy bundles and registries: any text, parsed as a bundle against the default
//! registry and as a registry, is accepted or refused with an error, never a panic; an
//! accepted bundle decides every input.
#![no_main]

use featurestore_server::policy::Policy;
use featurestore_server::registry::Registry;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let registry = Registry::embedded_default();
    let _ = Policy::from_toml(text, &registry);
    let _ = Registry::from_toml(text);
});
