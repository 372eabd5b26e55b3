use super::*;

fn names(text: &str, wanted: &[Detector]) -> Vec<(&'static str, String)> {
    find(text, wanted)
        .into_iter()
        .map(|f| (f.detector.name(), text[f.at].to_string()))
        .collect()
}

#[test]
fn emails_are_found_and_masked() {
    let t = "mail ops@example.com or A.B+x@mail.corp.cn, not user@localhost";
    assert_eq!(
        names(t, &[Detector::Email]),
        vec![
            ("email", "ops@example.com".to_string()),
            ("email", "A.B+x@mail.corp.cn".to_string())
        ]
    );
    assert_eq!(
        mask(t, &[Detector::Email]),
        "mail [EMAIL] or [EMAIL], not user@localhost"
    );
}

#[test]
fn mainland_mobiles_and_plus_numbers_are_phones_but_longer_digit_runs_are_not() {
    let found = names(
        "call 13812345678, +86 138 1234 5678 or +44 20 7946 0958; order 913812345678",
        &[Detector::Phone],
    );
    let got: Vec<&str> = found.iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(
        got,
        ["13812345678", "+86 138 1234 5678", "+44 20 7946 0958"]
    );
    assert!(
        find("12812345678", &[Detector::Phone]).is_empty(),
        "no 12x prefix"
    );
}

#[test]
fn bank_cards_pass_the_luhn_check_or_are_not_cards() {
    assert!(luhn("4111 1111 1111 1111"));
    assert!(!luhn("4111 1111 1111 1112"));
    assert!(luhn("79927398713"), "the textbook example");
    let t = "card 4111-1111-1111-1111, typo 4111 1111 1111 1112";
    assert_eq!(
        names(t, &[Detector::BankCard]),
        vec![("bank_card", "4111-1111-1111-1111".to_string())]
    );
    assert_eq!(
        mask(t, &[Detector::BankCard]),
        "card [BANK_CARD], typo 4111 1111 1111 1112"
    );
}

#[test]
fn resident_ids_need_their_check_character_and_a_real_birth_date() {
    // The standard's own example.
    assert!(cn_resident_id_valid("11010519491231002X"));
    assert!(cn_resident_id_valid("11010519491231002x"));
    assert!(!cn_resident_id_valid("110105194912310021"), "wrong check");
    assert!(
        !cn_resident_id_valid("11010519490231002X"),
        "no 31 February"
    );
    assert_eq!(
        names("id 11010519491231002X.", &[Detector::CnResidentId]),
        vec![("cn_resident_id", "11010519491231002X".to_string())]
    );
    assert!(find("id 110105194912310021", &[Detector::CnResidentId]).is_empty());
}

#[test]
fn api_keys_and_private_keys_are_secrets() {
    let t = "key sk-proj-abcdefghijklmnopqrstuv12 and AKIAABCDEFGHIJKLMNOP\n\
             -----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----";
    let got: Vec<String> = names(t, &[Detector::Secret])
        .into_iter()
        .map(|(_, s)| s)
        .collect();
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(got[2].starts_with("-----BEGIN RSA PRIVATE KEY-----"));
    assert!(find("sk-short", &[Detector::Secret]).is_empty());
}

#[test]
fn only_the_wanted_detectors_run_and_names_round_trip() {
    let t = "ops@example.com 13812345678";
    assert_eq!(find(t, &[Detector::Phone]).len(), 1);
    for d in Detector::ALL {
        assert_eq!(Detector::from_name(d.name()), Some(d));
    }
    assert_eq!(Detector::from_name("ssn"), None);
}

proptest::proptest! {
    #[test]
    fn masked_text_holds_nothing_a_detector_finds(s in "[a-z0-9@. +\\-X]{0,80}") {
        let masked = mask(&s, &Detector::ALL);
        proptest::prop_assert!(find(&masked, &Detector::ALL).is_empty(), "{s:?} -> {masked:?}");
    }

    #[test]
    fn any_text_is_scanned_without_a_panic(s in "\\PC{0,200}") {
        let _ = mask(&s, &Detector::ALL);
    }
}
