//! The exit codes of BSD's `sysexits.h`, in one place. mailnode reads them
//! from programs (a program's exit says whether to retry, see
//! `delivery::program::classify`) and gives them itself (`check`,
//! `send`, `ctl`, `runq`), as the mail tools it replaces do.

/// Successful termination.
pub const EX_OK: u8 = 0;
/// The command was used incorrectly (bad arguments).
pub const EX_USAGE: u8 = 64;
/// An input file did not exist or was not readable.
pub const EX_NOINPUT: u8 = 66;
/// The addressee is unknown.
pub const EX_NOUSER: u8 = 67;
/// A service is unavailable.
pub const EX_UNAVAILABLE: u8 = 69;
/// An internal software error.
pub const EX_SOFTWARE: u8 = 70;
/// An operating system error (cannot fork, cannot create a pipe).
pub const EX_OSERR: u8 = 71;
/// A temporary failure: the user is invited to retry.
pub const EX_TEMPFAIL: u8 = 75;
/// A file to write could not be created.
pub const EX_CANTCREAT: u8 = 73;
/// Something was found in an unconfigured or misconfigured state.
pub const EX_CONFIG: u8 = 78;
