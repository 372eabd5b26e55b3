//! Functions that build values from nothing (`range`, `generate_series`
//! as scalars, `repeat`, `lpad`, `rpad`, `array_repeat`) allocate their
//! whole result outside the memory pool. They are wrapped here to refuse,
//! before allocating, a call that would produce more than a set number of
//! elements or characters. The table forms of `generate_series` and
//! `range` stream in batches and are bounded by the timeout instead.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, FieldRef, Int64Type, IntervalMonthDayNanoType, TimeUnit};
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::{
    ColumnarValue, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
};
use datafusion::prelude::SessionContext;

use crate::tables::TOO_MANY_ROWS;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Shape {
    /// `range(start, stop[, step])`: elements per row.
    Series { inclusive: bool },
    /// `repeat(s, n)`: characters per row are `len(s) * n`.
    Repeat,
    /// `lpad(s, n)`, `rpad(s, n)`, `array_repeat(x, n)`: `n` per row.
    Count,
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct Capped {
    inner: Arc<ScalarUDF>,
    shape: Shape,
    cap: u64,
}

/// Replaces the session's generators with capped ones.
pub fn install(ctx: &SessionContext, cap: u64) {
    let wrap = [
        ("range", Shape::Series { inclusive: false }),
        ("generate_series", Shape::Series { inclusive: true }),
        ("repeat", Shape::Repeat),
        ("lpad", Shape::Count),
        ("rpad", Shape::Count),
        ("array_repeat", Shape::Count),
    ];
    let state = ctx.state();
    for (name, shape) in wrap {
        if let Some(inner) = state.scalar_functions().get(name) {
            ctx.register_udf(ScalarUDF::new_from_impl(Capped {
                inner: inner.clone(),
                shape,
                cap,
            }));
        }
    }
}

fn int64(v: &ColumnarValue, rows: usize) -> Result<ArrayRef> {
    let a = v.to_array(rows)?;
    Ok(match a.data_type() {
        DataType::Date32 => {
            let days = cast(&a, &DataType::Int64)?;
            let days = days.as_primitive::<Int64Type>();
            Arc::new(arrow::compute::kernels::arity::unary::<_, _, Int64Type>(
                days,
                |d| d.saturating_mul(86_400_000_000_000),
            ))
        }
        DataType::Timestamp(_, _) => {
            let ns = cast(&a, &DataType::Timestamp(TimeUnit::Nanosecond, None))?;
            cast(&ns, &DataType::Int64)?
        }
        DataType::Interval(_) => {
            let i = cast(
                &a,
                &DataType::Interval(arrow::datatypes::IntervalUnit::MonthDayNano),
            )?;
            let i = i.as_primitive::<IntervalMonthDayNanoType>();
            Arc::new(arrow::compute::kernels::arity::unary::<_, _, Int64Type>(
                i,
                |v| {
                    (v.months as i64)
                        .saturating_mul(30 * 86_400_000_000_000)
                        .saturating_add((v.days as i64).saturating_mul(86_400_000_000_000))
                        .saturating_add(v.nanoseconds)
                },
            ))
        }
        _ => cast(&a, &DataType::Int64)?,
    })
}

fn series_len(start: i64, stop: i64, step: i64, inclusive: bool) -> u64 {
    let (lo, hi, step) = match step {
        0 => return 0,
        s if s > 0 => (start as i128, stop as i128, s as i128),
        s => (stop as i128, start as i128, -(s as i128)),
    };
    let span = hi - lo;
    if span < 0 {
        return 0;
    }
    let n = span / step + i128::from(inclusive || span % step != 0);
    u64::try_from(n).unwrap_or(u64::MAX)
}

impl Capped {
    fn produced(&self, args: &ScalarFunctionArgs) -> Result<u64> {
        let rows = args.number_rows.max(1);
        let vals: Vec<ArrayRef> = args
            .args
            .iter()
            .map(|a| {
                if matches!(self.shape, Shape::Repeat) && a.data_type().is_string() {
                    Ok(cast(&a.to_array(rows)?, &DataType::Utf8)?)
                } else {
                    int64(a, rows)
                }
            })
            .collect::<Result<_>>()?;
        let i = |k: usize| vals.get(k).map(|a| a.as_primitive::<Int64Type>());
        let mut total: u64 = 0;
        for row in 0..rows {
            let get = |a: Option<&arrow::array::Int64Array>| {
                a.filter(|a| a.is_valid(row)).map(|a| a.value(row))
            };
            let n = match self.shape {
                Shape::Series { inclusive } => match vals.len() {
                    1 => series_len(0, get(i(0)).unwrap_or(0), 1, inclusive),
                    2 => series_len(get(i(0)).unwrap_or(0), get(i(1)).unwrap_or(0), 1, inclusive),
                    _ => series_len(
                        get(i(0)).unwrap_or(0),
                        get(i(1)).unwrap_or(0),
                        get(i(2)).unwrap_or(1),
                        inclusive,
                    ),
                },
                Shape::Repeat => {
                    let len = vals
                        .first()
                        .and_then(|a| a.as_string_opt::<i32>())
                        .filter(|a| a.is_valid(row))
                        .map_or(0, |a| a.value(row).len() as u64);
                    let times = vals
                        .get(1)
                        .map(|a| a.as_primitive::<Int64Type>())
                        .filter(|a| a.is_valid(row))
                        .map_or(0, |a| a.value(row).max(0) as u64);
                    len.saturating_mul(times)
                }
                Shape::Count => vals
                    .get(1)
                    .map(|a| a.as_primitive::<Int64Type>())
                    .filter(|a| a.is_valid(row))
                    .map_or(0, |a| a.value(row).max(0) as u64),
            };
            total = total.saturating_add(n);
        }
        Ok(total)
    }
}

impl ScalarUDFImpl for Capped {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }
    fn signature(&self) -> &Signature {
        self.inner.signature()
    }
    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.return_type(arg_types)
    }
    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        self.inner.return_field_from_args(args)
    }
    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let n = self.produced(&args)?;
        if n > self.cap {
            return Err(DataFusionError::Execution(format!(
                "{TOO_MANY_ROWS}: {}() would make {n} elements, over the limit of {}",
                self.inner.name(),
                self.cap
            )));
        }
        self.inner.invoke_with_args(args)
    }
}

#[cfg(test)]
mod tests {
    use super::series_len;

    #[test]
    fn series_lengths() {
        assert_eq!(series_len(1, 5, 1, true), 5);
        assert_eq!(series_len(1, 5, 1, false), 4);
        assert_eq!(series_len(5, 1, -2, true), 3);
        assert_eq!(series_len(1, 5, -1, true), 0);
        assert_eq!(series_len(0, 10, 3, false), 4);
        assert_eq!(series_len(i64::MIN, i64::MAX, 1, true), u64::MAX);
    }
}
