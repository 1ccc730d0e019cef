//! The test kit (`shoal-testkit`), as the tests name it.

pub use shoal_testkit::*;
