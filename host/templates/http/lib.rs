//! {{name}}: a Kiln function. `kiln build && kiln deploy`, then
//! `curl -H "authorization: Bearer $KILN_API_KEY" "$KILN_SERVER/fn/{{name}}/?name=you"`.
//! Its greeting is a variable (`kiln vars set {{name}} greeting=Hi`); what it prints is in
//! `kiln logs {{name}}`.

use kiln_guest::{Request, Response, StatusCode, text};

fn handle(req: Request) -> Response {
    let greeting = kiln_guest::variable("greeting").unwrap_or_else(|| "Hello".into());
    let who = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("name=")))
        .filter(|who| !who.is_empty())
        .unwrap_or("world")
        .to_string();
    println!("greeted {who}");
    text(StatusCode::OK, format!("{greeting}, {who}!\n"))
}

kiln_guest::export!(handle);
