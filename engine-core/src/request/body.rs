//! The `POST /v1/chat/completions` body: a prompt, its images (as data URIs, or as `file://`
//! references for a server that reads local frames itself), its schema.

use base64::Engine as _;
use serde_json::{Value, json};

use super::grammar::Constraint;
use super::image::Part;
use super::prompt::Prompt;

/// Stands in for image `i`'s URL in the JSON skeleton; replaced by its data URI.
fn image_slot(i: usize) -> String {
    format!("cinecut-image-slot-{i}")
}

/// The `POST /v1/chat/completions` body: the system message, then the text and the images as data
/// URIs or `file://` references (never `http://` URLs, which the server would fetch), constrained by
/// the schema. Without images the user's content is a plain string, which every server version
/// takes.
///
/// An image is a megabyte or more of base64: it is encoded straight into a buffer of the final size,
/// spliced into a small serialised skeleton, instead of passing through a JSON value (several copies
/// into growing buffers cost about 2 ms per 1080p frame, more than everything else the client does).
pub(crate) fn chat_request(prompt: &Prompt, images: &[Part], constraint: Constraint) -> Vec<u8> {
    let content = if images.is_empty() {
        json!(prompt.text)
    } else {
        let mut parts = vec![json!({"type": "text", "text": prompt.text})];
        parts.extend(images.iter().enumerate().map(|(i, part)| {
            let url = match part {
                Part::Inline(_) => image_slot(i),
                Part::File(url) => url.clone(),
            };
            json!({"type": "image_url", "image_url": {"url": url}})
        }));
        Value::Array(parts)
    };
    let mut messages = Vec::new();
    if let Some(system) = &prompt.system {
        messages.push(json!({"role": "system", "content": system}));
    }
    messages.push(json!({"role": "user", "content": content}));
    let mut skeleton = json!({
        "messages": messages,
        "temperature": prompt.temperature,
        "max_tokens": prompt.max_tokens,
        "stream": false,
    });
    let response_format = json!({
        "type": "json_schema",
        "json_schema": {"name": prompt.schema.name(), "schema": prompt.schema.value()},
    });
    match (constraint, prompt.schema.gbnf()) {
        (Constraint::Gbnf, Some(grammar)) => {
            // The schema rides along in a comment: a reader of the request (the server's debug
            // log, the fake server) sees what the grammar stands for.
            let grammar = format!(
                "# json_schema {}: {}\n{grammar}",
                prompt.schema.name(),
                prompt.schema.value()
            );
            skeleton["grammar"] = json!(grammar);
        }
        (Constraint::Llguidance, _) => {
            let grammar = format!("%llguidance {{}}\nstart: %json {}", prompt.schema.value());
            skeleton["grammar"] = json!(grammar);
        }
        (Constraint::Gbnf | Constraint::ResponseFormat, _) => {
            skeleton["response_format"] = response_format;
        }
        (Constraint::Off, _) => {}
    }
    let skeleton = skeleton.to_string();
    let inline = images
        .iter()
        .enumerate()
        .filter_map(|(i, part)| match part {
            Part::Inline(image) => Some((i, image)),
            Part::File(_) => None,
        });
    let encoded: usize = inline
        .clone()
        .map(|(_, image)| {
            base64::encoded_len(image.bytes.len(), true).expect("an image fits in memory")
        })
        .sum();
    let mut body = Vec::with_capacity(skeleton.len() + encoded + 64 * images.len());
    let mut rest = skeleton.as_str();
    for (i, image) in inline {
        // Each slot appears once as a JSON token of its own; text holding the same words would be a
        // different, escaped token inside a text part, so `"url":"SLOT"` is unambiguous.
        let token = format!("\"url\":\"{}\"", image_slot(i));
        let at = rest
            .find(&token)
            .expect("the skeleton holds every image slot");
        body.extend_from_slice(&rest.as_bytes()[..at]);
        body.extend_from_slice(format!("\"url\":\"data:{};base64,", image.mime).as_bytes());
        let start = body.len();
        let len = base64::encoded_len(image.bytes.len(), true).expect("an image fits in memory");
        body.resize(start + len, 0);
        let written = base64::engine::general_purpose::STANDARD
            .encode_slice(&image.bytes, &mut body[start..])
            .expect("the buffer has the encoded length");
        body.truncate(start + written);
        body.push(b'"');
        rest = &rest[at + token.len()..];
    }
    body.extend_from_slice(rest.as_bytes());
    body
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::image::Image;
    use crate::request::schema::Schema;

    #[test]
    fn a_text_prompt_has_a_system_message_and_plain_content() {
        let schema = Schema::new("anchors", json!({"type": "object"})).unwrap();
        let prompt = Prompt::new(&schema, "the subtitles").system("find anchors");
        let body = |constraint| -> Value {
            serde_json::from_slice(&chat_request(&prompt, &[], constraint)).unwrap()
        };
        let gbnf = body(Constraint::Gbnf);
        assert_eq!(
            gbnf["messages"][0],
            json!({"role": "system", "content": "find anchors"})
        );
        assert_eq!(
            gbnf["messages"][1],
            json!({"role": "user", "content": "the subtitles"})
        );
        assert_eq!(gbnf["max_tokens"], 128);
        // The engine's grammar, the schema named in its first line; no output parse asked for.
        let grammar = gbnf["grammar"].as_str().unwrap();
        assert!(grammar.starts_with("# json_schema anchors: {\"type\":\"object\"}\nroot ::= "));
        assert!(gbnf.get("response_format").is_none());
        let server = body(Constraint::ResponseFormat);
        assert_eq!(server["response_format"]["json_schema"]["name"], "anchors");
        assert!(server.get("grammar").is_none());
        let llg = body(Constraint::Llguidance);
        assert_eq!(
            llg["grammar"],
            "%llguidance {}\nstart: %json {\"type\":\"object\"}"
        );
        let off = body(Constraint::Off);
        assert!(off.get("grammar").is_none() && off.get("response_format").is_none());
        // A schema beyond the converter goes as response_format, even under Gbnf.
        let bounded = Schema::new("b", json!({"type": "integer", "minimum": 1})).unwrap();
        let body: Value = serde_json::from_slice(&chat_request(
            &Prompt::new(&bounded, "x"),
            &[],
            Constraint::Gbnf,
        ))
        .unwrap();
        assert!(body.get("grammar").is_none() && body["response_format"].is_object());
    }
    #[test]
    fn several_images_are_spliced_in_order_whatever_the_text_says() {
        let schema = Schema::new("s", json!({"type": "object"})).unwrap();
        let text = format!("\"url\":\"{}\" {}", image_slot(0), image_slot(1));
        let prompt = Prompt::new(&schema, text.clone());
        let images = [
            Part::Inline(Image {
                mime: "image/png",
                bytes: vec![0x89, b'P', b'N', b'G'],
            }),
            Part::File("file:///frames/a.jpg".into()),
            Part::Inline(Image {
                mime: "image/jpeg",
                bytes: vec![0xFF, 0xD8, 0xFF, 0xE0],
            }),
        ];
        let body: Value =
            serde_json::from_slice(&chat_request(&prompt, &images, Constraint::Gbnf)).unwrap();
        let parts = &body["messages"][0]["content"];
        assert_eq!(parts[0]["text"], text);
        assert_eq!(
            parts[1]["image_url"]["url"],
            "data:image/png;base64,iVBORw=="
        );
        assert_eq!(parts[2]["image_url"]["url"], "file:///frames/a.jpg");
        assert_eq!(
            parts[3]["image_url"]["url"],
            "data:image/jpeg;base64,/9j/4A=="
        );
    }
}
