//! Password hashing: argon2id with the crate's default parameters, stored as PHC strings.
//! Both functions are CPU-heavy (tens of milliseconds) and must run off the async runtime.

use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;

/// Longest password accepted, in bytes.
pub const MAX_PASSWORD: usize = 1024;

/// The PHC string (`$argon2id$v=19$...`) of `password` with a fresh random salt.
///
/// # Errors
/// Only if the system random source fails.
pub fn hash(password: &str) -> Result<String, String> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| format!("cannot hash password: {e}"))
}

/// Whether `password` matches the PHC string `phc`. A malformed `phc` matches nothing.
pub fn verify(phc: &str, password: &str) -> bool {
    Argon2::default()
        .verify_password(password.as_bytes(), phc)
        .is_ok()
}

/// Whether `phc` is an argon2id PHC string.
pub fn is_argon2id(phc: &str) -> bool {
    phc.starts_with("$argon2id$")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_salted_argon2id_and_verify() {
        let a = hash("secret").expect("hash");
        let b = hash("secret").expect("hash");
        assert!(is_argon2id(&a) && a != b, "{a} {b}");
        assert!(verify(&a, "secret"));
        assert!(!verify(&a, "Secret"));
        assert!(!verify("not a hash", "secret"));
    }
}
