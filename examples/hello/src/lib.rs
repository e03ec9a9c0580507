//! The smallest Kiln function: answers `hello` to every request.
fn hello(_req: kiln_guest::Request) -> &'static str {
    "hello\n"
}
kiln_guest::export!(hello);
