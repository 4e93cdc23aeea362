//! Seeds for chaos tests: every run prints its seed, and `NEMESIS_CHAOS_SEED` repeats a
//! run with the seed a failing one printed. Owns the seed only; each test draws from it.

/// The environment variable that fixes a chaos test's seed.
pub const SEED_VAR: &str = "NEMESIS_CHAOS_SEED";

/// The seed `NEMESIS_CHAOS_SEED` gives (a bad value fails the test, naming it), or a
/// random one; printed either way with how to repeat the run.
pub fn seed(test: &str) -> u64 {
    let seed = match std::env::var(SEED_VAR) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{SEED_VAR}={v:?} is not an unsigned integer")),
        Err(_) => rand::random(),
    };
    println!("chaos seed for {test}: {seed} (repeat with {SEED_VAR}={seed})");
    eprintln!("chaos seed for {test}: {seed} (repeat with {SEED_VAR}={seed})");
    seed
}
