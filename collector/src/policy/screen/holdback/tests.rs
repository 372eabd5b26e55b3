use std::collections::HashMap;

use super::*;
use crate::config::Config;
use crate::policy::screen::Screen;
use serde_json::json;

fn screen(rule: &str) -> Screen {
    let text = format!(
        "[upstreams.sim]\nkind = \"simulated\"\n[[routes]]\nmodel = \"m\"\ntargets = [{{ upstream = \"sim\" }}]\n[[guard]]\nname = \"g\"\n{rule}\n"
    );
    let config = Config::from_toml(&text).unwrap();
    Screen::new(
        &config.guards,
        &HashMap::new(),
        Default::default(),
        Default::default(),
    )
    .unwrap()
}

fn holdback(rule: &str) -> Holdback {
    let s = screen(rule);
    let rules = s.applying(Direction::Output, "m", "c", None);
    Holdback::new(rules, s.counters.clone()).unwrap()
}

fn event(text: &str) -> Vec<u8> {
    let doc = serde_json::json!({"choices": [{"index": 0, "delta": {"content": text}}]});
    format!("data: {doc}\n\n").into_bytes()
}

/// Pushes `pieces` as content events and `[DONE]`; the text the client
/// reads, and whether it was blocked.
fn run(h: &mut Holdback, pieces: &[&str]) -> (String, bool) {
    let mut out = Vec::new();
    let mut blocked = false;
    let mut take = |r: Released, out: &mut Vec<Bytes>| match r {
        Released::Events(e) => out.extend(e),
        Released::Blocked(_) => blocked = true,
    };
    for p in pieces {
        take(h.push(&event(p)), &mut out);
    }
    take(h.push(b"data: [DONE]\n\n"), &mut out);
    let mut text = String::new();
    for b in out {
        let s = String::from_utf8(b.to_vec()).unwrap();
        let data = s.trim().strip_prefix("data: ").unwrap();
        if let Ok(v) = serde_json::from_str::<Value>(data) {
            text.push_str(v["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
        }
    }
    (text, blocked)
}

#[test]
fn text_without_matches_passes_unchanged_and_in_order() {
    let mut h = holdback("detect = [\"email\"]\nholdback_chars = 8");
    let pieces = ["one ", "two ", "three ", "four ", "five ", "six"];
    assert_eq!(run(&mut h, &pieces), (pieces.concat(), false));
}

#[test]
fn events_are_released_once_more_than_the_holdback_follows_them() {
    let mut h = holdback("detect = [\"email\"]\nholdback_chars = 4");
    let Released::Events(first) = h.push(&event("abcd")) else {
        panic!()
    };
    assert!(first.is_empty(), "4 characters are held");
    let Released::Events(next) = h.push(&event("efgh")) else {
        panic!()
    };
    assert_eq!(next.len(), 1, "the first event goes once 4 follow it");
}

#[test]
fn a_match_split_anywhere_is_masked_or_blocked() {
    let text = "mail jo.doe@example.org today";
    for cut1 in 1..text.len() - 1 {
        for cut2 in [cut1 + 1, text.len() - 1] {
            let pieces = [&text[..cut1], &text[cut1..cut2], &text[cut2..]];
            let mut m = holdback("detect = [\"email\"]\naction = \"mask\"\nholdback_chars = 32");
            assert_eq!(run(&mut m, &pieces).0, "mail [EMAIL] today", "{pieces:?}");
            let mut b = holdback("detect = [\"email\"]\nholdback_chars = 32");
            let (seen, blocked) = run(&mut b, &pieces);
            assert!(blocked, "{pieces:?}");
            assert!(!seen.contains('@'), "{pieces:?}: {seen}");
        }
    }
}

#[test]
fn a_digit_run_at_the_end_waits_for_its_next_digits() {
    let mut m = holdback("detect = [\"phone\"]\naction = \"mask\"\nholdback_chars = 32");
    let (text, _) = run(&mut m, &["call 1380013", "8000", "1 now"]);
    assert_eq!(
        text, "call 138001380001 now",
        "12 digits are not a mobile number"
    );
    let mut m = holdback("detect = [\"phone\"]\naction = \"mask\"\nholdback_chars = 32");
    assert_eq!(
        run(&mut m, &["call 1380013", "8000", " now"]).0,
        "call [PHONE] now"
    );
}

#[test]
fn keywords_are_caught_across_chunks_ignoring_case() {
    let mut b = holdback("deny = [\"keyword:internal-only\"]");
    assert!(run(&mut b, &["this is INTER", "NAL-on", "ly"]).1);
}

fn choice_event(index: u64, delta: Value) -> Vec<u8> {
    let doc = serde_json::json!({"choices": [{"index": index, "delta": delta}]});
    format!("data: {doc}\n\n").into_bytes()
}

/// Pushes raw events and `[DONE]`; per choice index, the text read.
fn run_raw(
    h: &mut Holdback,
    events: &[Vec<u8>],
) -> (std::collections::BTreeMap<u64, String>, bool) {
    let mut out = Vec::new();
    let mut blocked = false;
    for e in events
        .iter()
        .map(Vec::as_slice)
        .chain([&b"data: [DONE]\n\n"[..]])
    {
        match h.push(e) {
            Released::Events(v) => out.extend(v),
            Released::Blocked(_) => {
                blocked = true;
                break;
            }
        }
    }
    let mut texts = std::collections::BTreeMap::new();
    for b in out {
        let s = String::from_utf8(b.to_vec()).unwrap();
        let Ok(v) = serde_json::from_str::<Value>(s.trim().trim_start_matches("data: ")) else {
            continue;
        };
        for c in v["choices"].as_array().into_iter().flatten() {
            let t: &mut String = texts.entry(c["index"].as_u64().unwrap()).or_default();
            t.push_str(c["delta"]["content"].as_str().unwrap_or(""));
            for call in c["delta"]["tool_calls"].as_array().into_iter().flatten() {
                t.push_str(call["function"]["arguments"].as_str().unwrap_or(""));
            }
        }
    }
    (texts, blocked)
}

#[test]
fn choices_are_checked_each_on_its_own() {
    let interleaved = [
        choice_event(0, json!({"content": "fine "})),
        choice_event(1, json!({"content": "secret AKIAIO"})),
        choice_event(0, json!({"content": "words "})),
        choice_event(1, json!({"content": "SFODNN7EXAMPLE"})),
    ];
    let mut b = holdback("detect = [\"secret\"]");
    assert!(
        run_raw(&mut b, &interleaved).1,
        "a split secret in choice 1"
    );
    let mut m = holdback("detect = [\"secret\"]\naction = \"mask\"");
    let (texts, _) = run_raw(&mut m, &interleaved);
    assert_eq!(texts[&1], "secret [SECRET]");
    assert_eq!(texts[&0], "fine words ");
    let across = [
        choice_event(0, json!({"content": "AKIAIOSFOD"})),
        choice_event(1, json!({"content": "NN7EXAMPLE"})),
    ];
    let mut b = holdback("detect = [\"secret\"]");
    let (texts, blocked) = run_raw(&mut b, &across);
    assert!(!blocked, "two choices never join into one match");
    assert_eq!(texts[&0], "AKIAIOSFOD");
}

#[test]
fn streamed_tool_call_arguments_are_checked() {
    let call = |args: &str| {
        choice_event(
            0,
            json!({"tool_calls": [{"index": 0, "function": {"arguments": args}}]}),
        )
    };
    let events = [call("{\"k\":\"AKIAIO"), call("SFODNN7EX"), call("AMPLE\"}")];
    let mut b = holdback("detect = [\"secret\"]");
    assert!(run_raw(&mut b, &events).1);
    let mut m = holdback("detect = [\"secret\"]\naction = \"mask\"");
    assert_eq!(run_raw(&mut m, &events).0[&0], "{\"k\":\"[SECRET]\"}");
}

#[test]
fn a_private_key_longer_than_the_holdback_is_caught_as_it_opens() {
    let body: String = (0..40)
        .map(|i| format!("MIIEowIBAAKCAQEA{i:04}abcdefghij\n"))
        .collect();
    let key = format!("-----BEGIN RSA PRIVATE KEY-----\n{body}-----END RSA PRIVATE KEY-----");
    let text = format!("here it is: {key} and that is all");
    let pieces: Vec<&str> = text
        .as_bytes()
        .chunks(40)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    let mut b = holdback("detect = [\"secret\"]");
    let (seen, blocked) = run(&mut b, &pieces);
    assert!(blocked);
    assert!(!seen.contains("MIIE"), "{seen}");
    let mut m = holdback("detect = [\"secret\"]\naction = \"mask\"");
    let (seen, blocked) = run(&mut m, &pieces);
    assert!(!blocked);
    assert_eq!(seen, "here it is: [SECRET] and that is all");
}

#[test]
fn a_choices_content_reasoning_and_tool_calls_are_texts_apart() {
    let email = "john.doe@example.com";
    let mut events = Vec::new();
    let reasoning = format!("think {email} done");
    let content = format!("ans {email} fin");
    let (r, c): (Vec<char>, Vec<char>) = (reasoning.chars().collect(), content.chars().collect());
    for i in 0..r.len().max(c.len()).div_ceil(3) {
        let piece = |v: &[char]| v.iter().skip(i * 3).take(3).collect::<String>();
        events.push(choice_event(0, json!({"reasoning_content": piece(&r)})));
        events.push(choice_event(0, json!({"content": piece(&c)})));
    }
    let mut b = holdback("detect = [\"email\"]");
    assert!(
        run_raw(&mut b, &events).1,
        "interleaved fields are each checked"
    );
    let mut m = holdback("detect = [\"email\"]\naction = \"mask\"");
    let (texts, _) = run_raw(&mut m, &events);
    assert_eq!(texts[&0], "ans [EMAIL] fin", "content masked in place");
    let call = |index: u64, args: &str| {
        choice_event(
            0,
            json!({"tool_calls": [{"index": index, "function": {"arguments": args}}]}),
        )
    };
    let parallel = [
        call(0, "{\"k\":\"AKIAIO"),
        call(1, "{\"j\":\"ghp_"),
        call(0, "SFODNN7EXAMPLE\"}"),
        call(1, "x\"}"),
    ];
    let mut b = holdback("detect = [\"secret\"]");
    assert!(
        run_raw(&mut b, &parallel).1,
        "each tool call's arguments are one text"
    );
}

#[test]
fn an_event_the_guard_cannot_read_ends_the_stream() {
    let mut h = holdback("detect = [\"email\"]");
    let bad = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\\ud83d john.doe@example.com\"}}]}\n\n";
    assert!(matches!(h.push(bad), Released::Blocked(b) if b.why == Why::Unreadable));
    assert!(matches!(h.push(&event("more")), Released::Events(e) if e.is_empty()));
}

#[test]
fn an_aborted_stream_sends_nothing_it_held() {
    let mut h = holdback("detect = [\"secret\"]");
    let Released::Events(out) = h.push(&event("key sk-a1B2c3D4e5F6")) else {
        panic!()
    };
    assert!(out.is_empty());
    h.abort();
    assert!(matches!(h.finish(), Released::Events(e) if e.is_empty()));
}
