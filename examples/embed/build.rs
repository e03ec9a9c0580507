//! Turns `model/vocab.txt` (one WordPiece token per line, its id the line number) into a
//! static table sorted by token, so a fresh instance per request looks tokens up in data
//! that is already in its memory image: no map to build per request.
use std::fmt::Write as _;

fn main() {
    println!("cargo::rerun-if-changed=model/vocab.txt");
    let text = std::fs::read_to_string("model/vocab.txt").expect("model/vocab.txt");
    let mut vocab: Vec<(&str, usize)> = text.lines().enumerate().map(|(i, t)| (t, i)).collect();
    vocab.sort();
    let mut out = format!("static VOCAB: [(&str, u32); {}] = [\n", vocab.len());
    for (token, id) in vocab {
        let _ = writeln!(out, "    ({token:?}, {id}),");
    }
    out.push_str("];\n");
    let dest = std::path::Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR")).join("vocab.rs");
    std::fs::write(dest, out).expect("writing vocab.rs");
}
