//! Cursor pagination, one way for every list of the API: `limit` (how many items, up to
//! the list's maximum; default 100) and `cursor` (the previous answer's `next_cursor`).
//! Each answer carries `next_cursor`: a string while there may be more, `null` at the end.
//!
//! A cursor names the last item the page held (a function's name, a version's number, an
//! entry's sequence number), not an offset, so items added or removed between two calls
//! never make a page repeat or skip one that was there all along. It is opaque to clients
//! (base64url of the list's name and that position): a cursor of one list is refused by
//! another, and nothing in it is a secret or an authority, since every page is filtered by
//! the caller's rights as the first one was.

use std::fmt::Display;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::ApiError;

/// Items a page holds when `limit` is not given.
pub(crate) const DEFAULT_LIMIT: usize = 100;

/// Where a page of one list starts and how long it is.
#[derive(Debug, Clone)]
pub(crate) struct Paging {
    list: &'static str,
    max: usize,
    /// Items in the page.
    pub limit: usize,
    /// The position (as the list writes it) of the last item of the previous page.
    after: Option<String>,
}

impl Paging {
    /// Paging of the list named `list`, whose pages hold at most `max` items.
    pub fn new(list: &'static str, max: usize) -> Paging {
        Paging {
            list,
            max,
            limit: DEFAULT_LIMIT.min(max),
            after: None,
        }
    }

    /// Reads the query string of a list that takes only `limit` and `cursor`.
    pub fn parse(list: &'static str, max: usize, query: &str) -> Result<Paging, ApiError> {
        let mut p = Paging::new(list, max);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = super::percent_decode(v).map_err(ApiError::InvalidRequest)?;
            if !p.take(k, &v).map_err(ApiError::InvalidRequest)? {
                return Err(ApiError::InvalidRequest(format!(
                    "unknown parameter {k:?} (known: limit, cursor)"
                )));
            }
        }
        Ok(p)
    }

    /// Takes `limit` or `cursor` from a list's own parameters; false for any other.
    pub fn take(&mut self, key: &str, value: &str) -> Result<bool, String> {
        match key {
            "limit" => {
                self.limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=self.max).contains(n))
                    .ok_or_else(|| format!("limit={value:?}: use 1 to {}", self.max))?;
            }
            "cursor" => {
                let bad = || {
                    format!(
                        "cursor={value:?} is not a cursor of this list: pass next_cursor from the previous answer"
                    )
                };
                let raw = URL_SAFE_NO_PAD.decode(value).map_err(|_| bad())?;
                let raw = String::from_utf8(raw).map_err(|_| bad())?;
                let (list, at) = raw.split_once(':').ok_or_else(bad)?;
                if list != self.list {
                    return Err(bad());
                }
                self.after = Some(at.to_string());
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The position after which this page starts, read as the list's key type.
    pub fn after<K: FromStr>(&self) -> Result<Option<K>, ApiError> {
        self.after
            .as_deref()
            .map(|a| {
                a.parse().map_err(|_| {
                    ApiError::InvalidRequest(format!("cursor of {} is damaged", self.list))
                })
            })
            .transpose()
    }

    /// The cursor of a page that ended at `last`.
    fn cursor(&self, last: impl Display) -> String {
        URL_SAFE_NO_PAD.encode(format!("{}:{last}", self.list))
    }

    /// One page of a list held in order of `key` (ascending): the items after the cursor,
    /// at most `limit`, and the next cursor.
    pub fn of_sorted<T, K>(
        &self,
        items: impl IntoIterator<Item = T>,
        key: impl Fn(&T) -> K,
    ) -> Result<(Vec<T>, Option<String>), ApiError>
    where
        K: Ord + Display + FromStr,
    {
        let after: Option<K> = self.after()?;
        let rest = items
            .into_iter()
            .filter(|t| after.as_ref().is_none_or(|a| key(t) > *a));
        Ok(self.finish(rest.take(self.limit + 1).collect(), key))
    }

    /// The page from up to `limit + 1` items fetched in list order (a store asked for one
    /// more than the page, to learn whether there is a next one).
    pub fn finish<T, K: Display>(
        &self,
        mut items: Vec<T>,
        key: impl Fn(&T) -> K,
    ) -> (Vec<T>, Option<String>) {
        let more = items.len() > self.limit;
        items.truncate(self.limit);
        let next = more
            .then(|| items.last().map(|t| self.cursor(key(t))))
            .flatten();
        (items, next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn walk(names: &[&str], limit: usize) -> Vec<Vec<String>> {
        let mut pages = Vec::new();
        let mut cursor = None;
        loop {
            let mut q = format!("limit={limit}");
            if let Some(c) = &cursor {
                q.push_str(&format!("&cursor={c}"));
            }
            let p = Paging::parse("functions", 1000, &q).unwrap();
            let (page, next) = p
                .of_sorted(names.iter().map(|s| s.to_string()), |s| s.clone())
                .unwrap();
            pages.push(page);
            match next {
                Some(n) => cursor = Some(n),
                None => return pages,
            }
        }
    }

    #[test]
    fn pages_cover_the_list_once_and_end_with_no_cursor() {
        let names = ["a", "b", "c", "d", "e"];
        assert_eq!(
            walk(&names, 2),
            vec![vec!["a", "b"], vec!["c", "d"], vec!["e"]]
        );
        // A list that fills its last page exactly says so without an empty page after.
        assert_eq!(walk(&names[..4], 2), vec![vec!["a", "b"], vec!["c", "d"]]);
        assert_eq!(walk(&[], 2), vec![Vec::<String>::new()]);
    }

    #[test]
    fn a_page_resumes_after_its_cursor_even_when_that_item_is_gone() {
        let p = Paging::parse("functions", 1000, "limit=2").unwrap();
        let (_, next) = p
            .of_sorted(["a", "b", "c"].map(String::from), |s| s.clone())
            .unwrap();
        let q = format!("limit=2&cursor={}", next.unwrap());
        let p = Paging::parse("functions", 1000, &q).unwrap();
        // "b" (the last item seen) was deleted, "bb" added: nothing seen repeats.
        let (page, _) = p
            .of_sorted(["a", "bb", "c"].map(String::from), |s| s.clone())
            .unwrap();
        assert_eq!(page, ["bb", "c"]);
    }

    #[test]
    fn bad_limits_and_foreign_or_forged_cursors_are_refused() {
        for q in [
            "limit=0",
            "limit=1001",
            "limit=x",
            "cursor=%%%",
            "cursor=abc",
            "page=2",
        ] {
            assert!(Paging::parse("functions", 1000, q).is_err(), "{q}");
        }
        let keys = Paging::new("keys", 1000).cursor("k1");
        let e = Paging::parse("functions", 1000, &format!("cursor={keys}")).unwrap_err();
        assert!(e.to_string().contains("next_cursor"), "{e}");
        let p = Paging::parse(
            "versions",
            1000,
            &format!("cursor={}", Paging::new("versions", 1).cursor("x")),
        )
        .unwrap();
        assert!(p.after::<u32>().is_err());
    }
}
