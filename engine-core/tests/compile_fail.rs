//! The typestate's promises, proved by code that must not compile (trybuild, with `.stderr`
//! snapshots under `tests/ui/`).

#[test]
fn steps_out_of_order_do_not_compile() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/ui/*.rs");
}
