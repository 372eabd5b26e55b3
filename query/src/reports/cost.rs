//! The cost report: requests, tokens and cost per period and group, with
//! totals that are the exact sums of the rows.

use std::collections::BTreeMap;

use chrono::Datelike;
use serde_json::{Map, Value};

use crate::engine::Engine;
use crate::reports::cells::Report;
use crate::reports::money::{Line, Sums, line_cost, money_lines};
use crate::reports::request::{CostRequest, Granularity, Group};
use crate::{Principal, QueryError};

/// The start of the line's period, as RFC 3339 in UTC.
fn period(g: Granularity, l: &Line) -> Value {
    let Some(day) = l.day else {
        return Value::Null;
    };
    let (day, hour) = match g {
        Granularity::Hour => (day, l.hour.unwrap_or(0)),
        Granularity::Day => (day, 0),
        Granularity::Month => (day.with_day(1).unwrap_or(day), 0),
    };
    Value::String(format!("{}T{hour:02}:00:00Z", day.format("%Y-%m-%d")))
}

pub async fn cost(engine: &Engine, who: &Principal, r: &CostRequest) -> Result<Report, QueryError> {
    let unit = match r.granularity {
        Granularity::Hour => "hour",
        Granularity::Day => "day",
        Granularity::Month => "month",
    };
    let keys = r
        .group_by
        .iter()
        .enumerate()
        .map(|(i, g)| g.expr(&format!("g{i}")))
        .collect();
    let model_key = r.group_by.iter().position(|g| *g == Group::Model);
    let hourly = r.granularity == Granularity::Hour;
    let lines = money_lines(engine, who, &r.window, keys, model_key, hourly).await?;
    let mut unpriced = Vec::new();
    let mut rows: BTreeMap<String, (Vec<Value>, Sums)> = BTreeMap::new();
    let mut totals = Sums::default();
    for l in lines {
        let cost = line_cost(&r.window, &l, &mut unpriced);
        totals.add(&l, cost);
        let mut keys = Vec::with_capacity(l.keys.len() + 1);
        keys.push(period(r.granularity, &l));
        keys.extend(l.keys.iter().cloned());
        let key = serde_json::to_string(&keys).unwrap_or_default();
        rows.entry(key)
            .or_insert_with(|| (keys, Sums::default()))
            .1
            .add(&l, cost);
    }
    let rows = rows
        .into_values()
        .map(|(keys, sums)| {
            let mut row = Map::new();
            row.insert(
                "period".into(),
                keys.first().cloned().unwrap_or(Value::Null),
            );
            for (g, v) in r.group_by.iter().zip(keys.iter().skip(1)) {
                row.insert(g.name(), v.clone());
            }
            sums.fill(&mut row);
            Value::Object(row)
        })
        .collect();
    let mut t = Map::new();
    totals.fill(&mut t);
    let mut params = Map::new();
    params.insert("granularity".into(), unit.into());
    params.insert(
        "group_by".into(),
        Value::Array(r.group_by.iter().map(|g| Value::String(g.name())).collect()),
    );
    params.insert(
        "catalog".into(),
        r.window
            .catalog
            .as_ref()
            .map_or(Value::Null, |c| c.version().into()),
    );
    Ok(Report {
        from: r.window.from,
        to: r.window.to,
        params,
        rows,
        totals: Value::Object(t),
        unpriced_models: unpriced,
    })
}
