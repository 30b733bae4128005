//! Evaluating a parsed search against the store's indexes.
//!
//! Each clause can be answered two ways: by scanning its index range (cheap when selective),
//! or by testing candidates against their stored values (cheap when the candidates are few).
//! The first clause whose scan stays under `DRIVER_CAP` ids drives; the other clauses filter
//! its ids through their stored values. Results are never the product of a full resource scan
//! unless the query has no selective clause at all.

use std::collections::BTreeSet;

use super::blind::probe_prefix;
use super::keys::{
    date_bounds, from_ord_i64, id_of_key, local_reference, param_prefix, payload_end, FIELD, SEP,
};
use super::query::{Clause, ClauseValue, Modifier, Prefix, SearchQuery, SortKey};
use super::registry::SearchParameter;
use super::value::{normalize, IndexValue};
use crate::error::Result;
use crate::fhir::{now_ms, ResourceType};
use crate::store::Store;

/// A clause whose scan yields more ids than this stops scanning and filters instead.
const DRIVER_CAP: usize = 5_000;

fn key(prefix: &[u8], tag: u8, parts: &[&str], terminated: bool) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.push(tag);
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(FIELD);
        }
        k.extend_from_slice(p.as_bytes());
    }
    if terminated {
        k.push(SEP);
    }
    k
}

/// Date predicate of the spec (search.html#prefix) on a target range [rl, rh].
pub fn date_matches(prefix: Prefix, pl: i64, ph: i64, rl: i64, rh: i64, now: i64) -> bool {
    match prefix {
        Prefix::Eq => rl >= pl && rh <= ph,
        Prefix::Ne => !(rl >= pl && rh <= ph),
        Prefix::Gt => rh > ph,
        Prefix::Lt => rl < pl,
        Prefix::Ge => rh > ph || (rl >= pl && rh <= ph),
        Prefix::Le => rl < pl || (rl >= pl && rh <= ph),
        Prefix::Sa => rl > ph,
        Prefix::Eb => rh < pl,
        Prefix::Ap => {
            let (al, ah) = approximate(pl, ph, now);
            rl <= ah && rh >= al
        }
    }
}

/// `ap`: the value's range widened by 10% of its distance from now (at least a day).
fn approximate(pl: i64, ph: i64, now: i64) -> (i64, i64) {
    let gap = ((now - pl).abs() / 10).max(86_400_000);
    (pl.saturating_sub(gap), ph.saturating_add(gap))
}

/// Does one stored value satisfy one clause value?
fn value_matches(
    modifier: &Modifier,
    q: &ClauseValue,
    v: &IndexValue,
    base: &str,
    now: i64,
) -> bool {
    match (q, v) {
        (ClauseValue::Str(s), IndexValue::Str(t)) => match modifier {
            Modifier::Exact => t == s,
            Modifier::Contains => normalize(t).contains(s.as_str()),
            _ => normalize(t).starts_with(s.as_str()),
        },
        (
            ClauseValue::Token { system, code },
            IndexValue::Token {
                system: vs,
                code: vc,
                ..
            },
        ) => {
            let code_ok = code.as_ref().map_or(true, |c| vc.as_ref() == Some(c));
            let system_ok = match system.as_deref() {
                None => true,
                Some("") => vs.is_none(),
                Some(s) => vs.as_deref() == Some(s),
            };
            code_ok && system_ok
        }
        (ClauseValue::Text(t), IndexValue::Token { text: Some(vt), .. }) => {
            normalize(vt).starts_with(t.as_str())
        }
        (
            ClauseValue::Reference(r),
            IndexValue::Reference {
                target: Some(t), ..
            },
        ) => {
            let local = local_reference(t, base);
            let wanted = local_reference(r, base);
            if wanted.contains('/') {
                local == wanted
            } else {
                local.split_once('/').is_some_and(|(_, id)| id == wanted)
            }
        }
        (
            ClauseValue::ReferenceIdentifier { system, value },
            IndexValue::Reference {
                identifier: Some((vs, vv)),
                ..
            },
        ) => vv == value && system.as_ref().map_or(true, |s| vs.as_ref() == Some(s)),
        (ClauseValue::Uri(u), IndexValue::Uri(t)) => match modifier {
            Modifier::Below => t.starts_with(u.as_str()),
            Modifier::Above => u.starts_with(t.as_str()),
            _ => t == u,
        },
        (ClauseValue::Date { prefix, lo, hi }, IndexValue::Date { lo: rl, hi: rh }) => {
            date_matches(*prefix, *lo, *hi, *rl, *rh, now)
        }
        _ => false,
    }
}

/// Does one resource (fetched from another organization, so not in this node's indexes)
/// satisfy every clause of a query?
pub fn resource_matches(
    query: &SearchQuery,
    resource: &serde_json::Value,
    base: &str,
    now: i64,
) -> bool {
    query.clauses.iter().all(|clause| {
        let values: Vec<Vec<IndexValue>> = clause
            .params
            .iter()
            .map(|p| crate::search::extract(p, query.rtype, resource))
            .collect();
        clause_matches(clause, &values, base, now)
    })
}

/// Does a resource with these stored values (one list per clause parameter) satisfy the clause?
fn clause_matches(clause: &Clause, values: &[Vec<IndexValue>], base: &str, now: i64) -> bool {
    let all: Vec<&IndexValue> = values.iter().flatten().collect();
    match &clause.modifier {
        Modifier::Missing(missing) => all.is_empty() == *missing,
        Modifier::Not => !clause.values.iter().any(|q| {
            all.iter()
                .any(|v| value_matches(&Modifier::None, q, v, base, now))
        }),
        m => clause
            .values
            .iter()
            .any(|q| all.iter().any(|v| value_matches(m, q, v, base, now))),
    }
}

enum Scan {
    Complete(BTreeSet<String>),
    TooLarge,
}

struct Collector<'a> {
    ids: &'a mut BTreeSet<String>,
    cap: usize,
    overflow: bool,
}

impl Collector<'_> {
    fn add(&mut self, id: &str) -> bool {
        if !self.ids.contains(id) {
            self.ids.insert(id.to_string());
        }
        if self.ids.len() > self.cap {
            self.overflow = true;
            return false;
        }
        true
    }
}

/// Ids whose values for `param` positively match `q` (ignoring :not / :missing). Returns
/// whether the ids are only candidates, to be rechecked against their stored values (a
/// blinded lookup narrower than the query, or a scan that cannot test the value at all).
#[allow(clippy::too_many_arguments)]
fn scan_value(
    store: &Store,
    rtype: ResourceType,
    param: &SearchParameter,
    modifier: &Modifier,
    q: &ClauseValue,
    base: &str,
    now: i64,
    c: &mut Collector,
) -> Result<bool> {
    let prefix = param_prefix(rtype, &param.code);
    let plen = prefix.len();
    let blinding = store.blinding();
    let by_prefix = |start: Vec<u8>, c: &mut Collector| -> Result<()> {
        store.scan_index_prefix(&start, |k, _| {
            id_of_key(plen, k).map_or(true, |id| c.add(&id))
        })
    };
    // A blinded term's entries end in SEP + id.
    let by_term = |mut term: Vec<u8>, c: &mut Collector| -> Result<()> {
        term.push(SEP);
        by_prefix(term, c)
    };
    // Normalised text looked up through its longest indexed prefix.
    let by_string_prefix = |text: &str, c: &mut Collector| -> Result<bool> {
        if text.is_empty() {
            // Every text starts with "": every resource with a value.
            store.scan_with_values(rtype, &prefix, |id| c.add(id))?;
            return Ok(false);
        }
        let (len, whole) = probe_prefix(text);
        if len == 0 {
            // Shorter than every indexed prefix: every value is a candidate.
            store.scan_with_values(rtype, &prefix, |id| c.add(id))?;
            return Ok(true);
        }
        by_term(blinding.term_key(&prefix, b'S', &text[..len]), c)?;
        Ok(!whole)
    };
    match (q, modifier) {
        // Candidates whose normalised text starts alike; `scan_clause` rechecks the exact text.
        (ClauseValue::Str(s), Modifier::Exact) => by_string_prefix(&normalize(s), c),
        // No term finds a substring: every resource with a value is a candidate.
        (ClauseValue::Str(_), Modifier::Contains) => {
            store.scan_with_values(rtype, &prefix, |id| c.add(id))?;
            Ok(true)
        }
        (ClauseValue::Str(s), _) => by_string_prefix(s, c),
        (ClauseValue::Token { system, code }, _) => match (system.as_deref(), code.as_deref()) {
            (None, Some(code)) => {
                by_prefix(key(&prefix, b'T', &[code, ""], false), c)?;
                by_term(blinding.term_key(&prefix, b'P', code), c)?;
                Ok(false)
            }
            (Some(system), Some(code)) => {
                let before = c.ids.len();
                by_prefix(key(&prefix, b'T', &[code, system], true), c)?;
                let clear = c.ids.len() - before;
                by_term(blinding.term_key(&prefix, b'P', code), c)?;
                // Personal values are found by value alone; their system is rechecked.
                Ok(c.ids.len() - before > clear)
            }
            (Some(system), None) => {
                by_prefix(key(&prefix, b'Y', &[system], true), c)?;
                Ok(false)
            }
            (None, None) => Ok(false),
        },
        (ClauseValue::Text(t), _) => {
            by_prefix(key(&prefix, b'X', &[t], false), c)?;
            Ok(false)
        }
        (ClauseValue::Reference(r), _) => {
            let local = local_reference(r, base);
            if local.contains('/') {
                by_prefix(key(&prefix, b'R', &[&local], true), c)?;
            } else {
                by_prefix(key(&prefix, b'D', &[&local], true), c)?;
            }
            Ok(false)
        }
        (ClauseValue::ReferenceIdentifier { system, value }, _) => {
            by_term(blinding.term_key(&prefix, b'I', value), c)?;
            Ok(system.is_some())
        }
        (ClauseValue::Uri(u), Modifier::Below) => {
            by_prefix(key(&prefix, b'U', &[u], false), c)?;
            Ok(false)
        }
        (ClauseValue::Uri(u), Modifier::Above) => {
            store.scan_index_prefix(&key(&prefix, b'U', &[], false), |k, _| {
                let text_end = payload_end(k).unwrap_or(k.len()).max(plen + 1);
                let t = std::str::from_utf8(&k[plen + 1..text_end]).unwrap_or("");
                if u.starts_with(t) {
                    id_of_key(plen, k).map_or(true, |id| c.add(&id))
                } else {
                    true
                }
            })?;
            Ok(false)
        }
        (ClauseValue::Uri(u), _) => {
            by_prefix(key(&prefix, b'U', &[u], true), c)?;
            Ok(false)
        }
        (ClauseValue::Date { prefix: p, lo, hi }, _) => {
            // Scan the ordering (by start 'L' or by end 'H') that bounds the answer, and test the
            // other bound from the entry's value.
            let (tag, from, to): (u8, i64, i64) = match p {
                Prefix::Eq => (b'L', *lo, *hi),
                Prefix::Lt => (b'L', i64::MIN, lo.saturating_sub(1)),
                Prefix::Le => (b'L', i64::MIN, *hi),
                Prefix::Sa => (b'L', hi.saturating_add(1), i64::MAX),
                Prefix::Gt => (b'H', hi.saturating_add(1), i64::MAX),
                Prefix::Ge => (b'H', *lo, i64::MAX),
                Prefix::Eb => (b'H', i64::MIN, lo.saturating_sub(1)),
                Prefix::Ne => (b'L', i64::MIN, i64::MAX),
                Prefix::Ap => (b'L', i64::MIN, approximate(*lo, *hi, now).1),
            };
            let (start, end) = date_bounds(&prefix, tag, from, to);
            store.scan_index(&start, Some(&end), |k, v| {
                if v.len() < 8 || k.len() < plen + 9 {
                    return true;
                }
                let this = from_ord_i64(&k[plen + 1..plen + 9]);
                let other = from_ord_i64(v);
                let (rl, rh) = if tag == b'L' {
                    (this, other)
                } else {
                    (other, this)
                };
                if date_matches(*p, *lo, *hi, rl, rh, now) {
                    id_of_key(plen, k).map_or(true, |id| c.add(&id))
                } else {
                    true
                }
            })?;
            Ok(false)
        }
        (ClauseValue::Flag, _) => {
            store.scan_with_values(rtype, &prefix, |id| c.add(id))?;
            Ok(false)
        }
    }
}

fn all_ids(store: &Store, rtype: ResourceType) -> Result<BTreeSet<String>> {
    let mut ids = BTreeSet::new();
    store.scan_ids(rtype, |id| {
        ids.insert(id.to_string());
        true
    })?;
    Ok(ids)
}

fn scan_clause(
    store: &Store,
    rtype: ResourceType,
    clause: &Clause,
    base: &str,
    now: i64,
    cap: usize,
) -> Result<Scan> {
    let mut positive = BTreeSet::new();
    let mut c = Collector {
        ids: &mut positive,
        cap,
        overflow: false,
    };
    let complemented = matches!(clause.modifier, Modifier::Not | Modifier::Missing(true));
    let inner_modifier = match &clause.modifier {
        Modifier::Not => Modifier::None,
        m => m.clone(),
    };
    let mut recheck = clause.modifier == Modifier::Exact;
    for param in &clause.params {
        for q in &clause.values {
            recheck |= scan_value(store, rtype, param, &inner_modifier, q, base, now, &mut c)?;
            if c.overflow {
                return Ok(Scan::TooLarge);
            }
        }
    }
    if recheck && !positive.is_empty() {
        let positive_clause = Clause {
            modifier: inner_modifier,
            ..clause.clone()
        };
        positive = filter_by_values(store, rtype, &positive_clause, &positive, base, now)?;
    }
    if complemented {
        if cap != usize::MAX {
            // The complement of a small set is large: let another clause drive.
            return Ok(Scan::TooLarge);
        }
        let mut all = all_ids(store, rtype)?;
        all.retain(|id| !positive.contains(id));
        return Ok(Scan::Complete(all));
    }
    Ok(Scan::Complete(positive))
}

/// The candidates whose stored values satisfy the clause.
fn filter_by_values(
    store: &Store,
    rtype: ResourceType,
    clause: &Clause,
    candidates: &BTreeSet<String>,
    base: &str,
    now: i64,
) -> Result<BTreeSet<String>> {
    let ids: Vec<&str> = candidates.iter().map(String::as_str).collect();
    let codes: Vec<&str> = clause.params.iter().map(|p| p.code.as_str()).collect();
    let per_param = store.values(rtype, &codes, &ids)?;
    Ok(ids
        .iter()
        .enumerate()
        .filter(|(n, _)| {
            let values: Vec<Vec<IndexValue>> = per_param.iter().map(|v| v[*n].clone()).collect();
            clause_matches(clause, &values, base, now)
        })
        .map(|(_, id)| id.to_string())
        .collect())
}

/// AND-ed date clauses on one single-valued parameter all constrain the same value, so one
/// scan of its start ordering over a bounded window answers them together. Returns the
/// clauses answered and the ids, or None when no such group is bounded on both sides.
fn single_date_group(
    store: &Store,
    rtype: ResourceType,
    clauses: &[Clause],
    now: i64,
) -> Result<Option<(Vec<usize>, BTreeSet<String>)>> {
    for (first, c) in clauses.iter().enumerate() {
        let Some(width) = c.single_date_width else {
            continue;
        };
        let code = &c.params[0].code;
        let group: Vec<usize> = (first..clauses.len())
            .filter(|&i| {
                clauses[i].single_date_width.is_some()
                    && clauses[i].params[0].code == *code
                    && clauses[i].values.len() == 1
            })
            .collect();
        if group.len() < 2 {
            continue;
        }
        let (mut rl_lo, mut rl_hi, mut rh_lo) = (i64::MIN, i64::MAX, i64::MIN);
        let preds: Vec<(Prefix, i64, i64)> = group
            .iter()
            .filter_map(|&i| match clauses[i].values[0] {
                ClauseValue::Date { prefix, lo, hi } => Some((prefix, lo, hi)),
                _ => None,
            })
            .collect();
        for &(p, pl, ph) in &preds {
            match p {
                Prefix::Eq => {
                    rl_lo = rl_lo.max(pl);
                    rl_hi = rl_hi.min(ph);
                }
                Prefix::Gt => rh_lo = rh_lo.max(ph.saturating_add(1)),
                Prefix::Ge => rh_lo = rh_lo.max(pl),
                Prefix::Lt | Prefix::Eb => rl_hi = rl_hi.min(pl.saturating_sub(1)),
                Prefix::Le => rl_hi = rl_hi.min(ph),
                Prefix::Sa => rl_lo = rl_lo.max(ph.saturating_add(1)),
                Prefix::Ap => {
                    let (al, ah) = approximate(pl, ph, now);
                    rl_hi = rl_hi.min(ah);
                    rh_lo = rh_lo.max(al);
                }
                Prefix::Ne => {}
            }
        }
        let prefix = param_prefix(rtype, code);
        // The widest value actually indexed bounds how far before `rh_lo` a match can start.
        let width = match store.date_width(&prefix) {
            Some(w) => w.min(width),
            None => return Ok(Some((group, BTreeSet::new()))),
        };
        let from = rl_lo.max(rh_lo.saturating_sub(width));
        if from == i64::MIN || rl_hi == i64::MAX {
            continue;
        }
        let plen = prefix.len();
        let mut ids = BTreeSet::new();
        if from <= rl_hi {
            let (start, end) = date_bounds(&prefix, b'L', from, rl_hi);
            store.scan_index(&start, Some(&end), |k, v| {
                if v.len() >= 8 && k.len() > plen + 9 {
                    let (rl, rh) = (from_ord_i64(&k[plen + 1..plen + 9]), from_ord_i64(v));
                    if preds
                        .iter()
                        .all(|&(p, pl, ph)| date_matches(p, pl, ph, rl, rh, now))
                    {
                        if let Some(id) = id_of_key(plen, k) {
                            ids.insert(id.to_string());
                        }
                    }
                }
                true
            })?;
        }
        return Ok(Some((group, ids)));
    }
    Ok(None)
}

/// Every id matching the query's clauses, in the query's sort order.
pub fn matching_ids(store: &Store, base: &str, query: &SearchQuery) -> Result<Vec<String>> {
    let now = now_ms();
    let rtype = query.rtype;
    let ids: BTreeSet<String> = if query.clauses.is_empty() {
        all_ids(store, rtype)?
    } else {
        // Pick the driver: a bounded single-valued date range, else the first clause whose
        // scan is small, else the first clause.
        let mut driver: Option<(Vec<usize>, BTreeSet<String>)> =
            single_date_group(store, rtype, &query.clauses, now)?;
        if driver.is_none() {
            for (i, clause) in query.clauses.iter().enumerate() {
                if let Scan::Complete(set) =
                    scan_clause(store, rtype, clause, base, now, DRIVER_CAP)?
                {
                    driver = Some((vec![i], set));
                    break;
                }
            }
        }
        let (answered, mut set) = match driver {
            Some(d) => d,
            None => match scan_clause(store, rtype, &query.clauses[0], base, now, usize::MAX)? {
                Scan::Complete(s) => (vec![0], s),
                Scan::TooLarge => unreachable!("uncapped scans complete"),
            },
        };
        for (i, clause) in query.clauses.iter().enumerate() {
            if answered.contains(&i) || set.is_empty() {
                continue;
            }
            set = filter_by_values(store, rtype, clause, &set, base, now)?;
        }
        set
    };
    let mut ids: Vec<String> = ids.into_iter().collect();
    sort(store, rtype, &query.sort, &mut ids)?;
    Ok(ids)
}

#[derive(PartialEq, PartialOrd, Eq, Ord, Clone, Debug)]
enum SortValue {
    Missing,
    Date(i64),
    Text(String),
}

fn sort_value(values: &[IndexValue], desc: bool) -> SortValue {
    let mut keys = values.iter().filter_map(|v| match v {
        IndexValue::Date { lo, hi } => Some(SortValue::Date(if desc { *hi } else { *lo })),
        IndexValue::Str(s) => Some(SortValue::Text(normalize(s))),
        IndexValue::Token { code, text, .. } => {
            code.clone().or_else(|| text.clone()).map(SortValue::Text)
        }
        IndexValue::Reference { target, .. } => target.clone().map(SortValue::Text),
        IndexValue::Uri(u) => Some(SortValue::Text(u.clone())),
    });
    let first = keys.next();
    let best = keys.fold(first, |acc, k| match acc {
        Some(a) if (desc && a >= k) || (!desc && a <= k) => Some(a),
        _ => Some(k),
    });
    best.unwrap_or(SortValue::Missing)
}

fn sort(
    store: &Store,
    rtype: ResourceType,
    keys: &[(SortKey, bool)],
    ids: &mut Vec<String>,
) -> Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let mut columns: Vec<Vec<SortValue>> = Vec::new();
    for (key, desc) in keys {
        columns.push(match key {
            SortKey::Id => refs
                .iter()
                .map(|id| SortValue::Text(id.to_string()))
                .collect(),
            SortKey::Param(p) => store
                .values(rtype, &[&p.code], &refs)?
                .swap_remove(0)
                .iter()
                .map(|v| sort_value(v, *desc))
                .collect(),
        });
    }
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by(|a, b| {
        for (col, (_, desc)) in columns.iter().zip(keys) {
            // Missing values sort last in either direction.
            let (x, y) = (&col[*a], &col[*b]);
            let ord = match (x, y) {
                (SortValue::Missing, SortValue::Missing) => std::cmp::Ordering::Equal,
                (SortValue::Missing, _) => std::cmp::Ordering::Greater,
                (_, SortValue::Missing) => std::cmp::Ordering::Less,
                _ if *desc => y.cmp(x),
                _ => x.cmp(y),
            };
            if ord != std::cmp::Ordering::Equal {
                return ord;
            }
        }
        ids[*a].cmp(&ids[*b])
    });
    let sorted: Vec<String> = order
        .into_iter()
        .map(|i| std::mem::take(&mut ids[i]))
        .collect();
    *ids = sorted;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn date_prefixes_follow_the_spec_table() {
        // Parameter: the whole of 2020. Targets as [lo, hi].
        let (pl, ph) = (100, 199);
        let inside = (120, 130);
        let before = (10, 20);
        let after = (300, 310);
        let straddle = (150, 250);
        let now = 1000;
        let m = |p, r: (i64, i64)| date_matches(p, pl, ph, r.0, r.1, now);
        assert!(m(Prefix::Eq, inside) && !m(Prefix::Eq, straddle));
        assert!(m(Prefix::Ne, straddle) && !m(Prefix::Ne, inside));
        assert!(m(Prefix::Gt, after) && m(Prefix::Gt, straddle) && !m(Prefix::Gt, inside));
        assert!(m(Prefix::Lt, before) && !m(Prefix::Lt, inside));
        assert!(m(Prefix::Ge, inside) && m(Prefix::Ge, after) && !m(Prefix::Ge, before));
        assert!(m(Prefix::Le, inside) && m(Prefix::Le, before) && !m(Prefix::Le, after));
        assert!(m(Prefix::Sa, after) && !m(Prefix::Sa, straddle));
        assert!(m(Prefix::Eb, before) && !m(Prefix::Eb, inside));
    }

    #[test]
    fn sort_values_take_the_extreme_in_the_sort_direction() {
        let vals = vec![
            IndexValue::Date { lo: 5, hi: 9 },
            IndexValue::Date { lo: 1, hi: 3 },
        ];
        assert_eq!(sort_value(&vals, false), SortValue::Date(1));
        assert_eq!(sort_value(&vals, true), SortValue::Date(9));
        assert_eq!(sort_value(&[], true), SortValue::Missing);
    }
}
