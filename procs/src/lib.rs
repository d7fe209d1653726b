//! Step processes: starting them in their own process groups, capturing their output and
//! outputs, and making sure nothing of an attempt outlives it.
//!
//! - [`spawn`]: start a process ([`spawn::Spec`]), wait for it with a timeout and a stop signal,
//!   end its whole group, read its `$CAIRN_OUTPUT` file.
//! - [`proc`]: what `/proc` says: our identity, whether a recorded process lives, which processes
//!   belong to an attempt (by group and by the [`proc::MARKER_VAR`] marker), and ending them.
//!
//! - [`remote`]: the same on another host over SSH: the OpenSSH transport, a step started there
//!   by a shell wrapper, its process group ended there.
//!
//! Only this crate spawns or signals processes.

pub mod adopt;
pub mod proc;
pub mod remote;
pub mod spawn;
