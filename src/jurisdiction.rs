//! Jurisdiction codes: the one canonical form of the place a user's privacy state names.
//!
//! A jurisdiction is an assigned ISO 3166-1 alpha-2 country code ("DE") or an ISO 3166-2
//! subdivision code ("US-CA"), upper case; empty means unknown. The lists come from the
//! `rust_iso3166` crate. Case and surrounding spaces are normalised (the mapping is
//! unambiguous); everything else is refused, because a code the policy cannot place must
//! never be mistaken for a country it allows: three-letter and numeric codes, aliases
//! ("UK", "EL"), exceptionally reserved and user-assigned codes ("EU", "XK"), unassigned
//! codes and region names.

/// Aliases in common use for a country whose ISO 3166-1 alpha-2 code is another; named in
/// the refusal so that the sender knows what to send instead.
const ALIASES: [(&str, &str); 2] = [("UK", "GB"), ("EL", "GR")];

/// The canonical form of `code` as a privacy system sent it, or why it has none.
pub fn canonical(code: &str) -> Result<String, String> {
    let upper = code.trim().to_ascii_uppercase();
    if upper.is_empty() || is_assigned(&upper) {
        return Ok(upper);
    }
    let problem = if let Some((_, instead)) = ALIASES.iter().find(|(alias, _)| *alias == upper) {
        format!("{code:?} is not an ISO 3166-1 alpha-2 code; this country's code is {instead:?}")
    } else if let Some(country) = rust_iso3166::from_alpha3(&upper) {
        format!(
            "{code:?} is a three-letter code; send the alpha-2 code {:?}",
            country.alpha2
        )
    } else if let Some(country) = rust_iso3166::from_numeric_str(&upper) {
        format!(
            "{code:?} is a numeric code; send the alpha-2 code {:?}",
            country.alpha2
        )
    } else if let Some((country, _)) = upper.split_once('-')
        && rust_iso3166::from_alpha2(country).is_some()
    {
        format!("{code:?} is not an ISO 3166-2 subdivision of {country}")
    } else {
        format!(
            "{code:?} is not an assigned ISO 3166-1 alpha-2 code (\"DE\") or ISO 3166-2 \
             subdivision code (\"US-CA\")"
        )
    };
    Err(problem)
}

/// Whether `code` is, exactly as written, an assigned alpha-2 country code or an ISO
/// 3166-2 subdivision code.
pub fn is_assigned(code: &str) -> bool {
    if code.contains('-') {
        rust_iso3166::iso3166_2::from_code(code).is_some()
    } else {
        rust_iso3166::from_alpha2(code).is_some()
    }
}

/// The country of an assigned code: the code itself, or a subdivision's country part.
pub fn country(code: &str) -> &str {
    code.split_once('-').map_or(code, |(country, _)| country)
}

/// Every assigned code: the alpha-2 country codes, then the subdivision codes.
pub fn assigned_codes() -> impl Iterator<Item = &'static str> {
    rust_iso3166::ALL_ALPHA2.iter().copied().chain(
        rust_iso3166::iso3166_2::SUBDIVISION_MAP
            .values()
            .map(|subdivision| subdivision.code),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assigned_codes_are_canonical_and_case_and_spaces_are_normalised() {
        assert_eq!(canonical("DE"), Ok("DE".to_string()));
        assert_eq!(canonical(" de "), Ok("DE".to_string()));
        assert_eq!(canonical("us-ca"), Ok("US-CA".to_string()));
        assert_eq!(canonical("GB-ENG"), Ok("GB-ENG".to_string()));
        assert_eq!(canonical(""), Ok(String::new()));
        assert_eq!(canonical("  "), Ok(String::new()));
    }

    #[test]
    fn everything_else_is_refused_saying_what_to_send() {
        let refusal = |code: &str| canonical(code).expect_err(code);
        assert!(refusal("UK").contains("\"GB\""), "{}", refusal("UK"));
        assert!(refusal("EL").contains("\"GR\""));
        assert!(refusal("DEU").contains("three-letter code; send the alpha-2 code \"DE\""));
        assert!(refusal("276").contains("\"DE\""));
        assert!(refusal("US-XX").contains("not an ISO 3166-2 subdivision of US"));
        for code in [
            "XK", "EU", "ZZ", "AA", "Europe", "Germany", "D", "DE-", "-DE", "DE_BY", "U S",
        ] {
            assert!(canonical(code).is_err(), "{code:?} was accepted");
        }
    }

    #[test]
    fn the_lists_hold_every_country_and_their_subdivisions() {
        let codes: Vec<&str> = assigned_codes().collect();
        let countries = codes.iter().filter(|code| !code.contains('-')).count();
        assert_eq!(countries, 249, "ISO 3166-1 assigns 249 alpha-2 codes");
        assert!(
            codes.len() > 5000,
            "{} subdivision codes",
            codes.len() - countries
        );
        for code in &codes {
            assert!(is_assigned(code), "{code}");
            assert!(is_assigned(country(code)), "the country of {code}");
            assert_eq!(canonical(code).as_deref(), Ok(*code));
        }
    }
}
