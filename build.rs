//! Rebuild when a migration is added: `sqlx::migrate!` embeds the folders at
//! compile time, and without this Cargo would not notice a new file in them
//! (what `sqlx migrate build-script` generates).

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
