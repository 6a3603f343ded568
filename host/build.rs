// `sqlx::migrate!` embeds ../migrations at compile time, but Cargo does not know the macro
// reads that folder: without this, an edited or added migration is not in the next build.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
