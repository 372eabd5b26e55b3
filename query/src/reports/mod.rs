//! The cost and ROI reports: fixed queries built with DataFusion's
//! DataFrame API in the caller's own session (so a consumer's report only
//! covers its rows), with money summed as exact decimals.
//!
//! Money is aggregated per (report row, priced model, day) in SQL; the
//! price in force that day is applied here, so any window can be repriced
//! against another catalog (`catalog=`) or another model (`reprice=`).

//! Its parts, in the order a report is made: [`request`] (parameters),
//! [`money`] (the caller's rows in the window summed into money lines),
//! [`cells`] (reading result cells, writing money and rates), then the two
//! reports, [`cost`] and [`roi`] (with [`stats`], the figures that do not
//! reprice).

pub mod cells;
pub mod cost;
pub mod money;
pub mod request;
pub mod roi;
pub mod stats;

pub use cells::Report;
pub use cost::cost;
pub use request::{CostRequest, Granularity, Group, Reprice, RoiRequest, SelfHost, Window};
pub use roi::roi;
