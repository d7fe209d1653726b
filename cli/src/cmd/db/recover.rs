//! `cairn db recover`: makes a database whose write-ahead log is damaged usable again, keeping
//! what is readable and never giving again an op id that may have been shown.

use anyhow::Context as _;

use crate::db::DbArgs;
use crate::exit::Failure;
use crate::output::Output;

/// Recover a SQLite database whose write-ahead log (`<db>-wal`) is damaged, when there is no
/// backup to restore.
///
/// Keeps what SQLite can read (everything committed before the damage); the ops recorded after
/// it are lost. Copies of the database and its log as they were are kept beside them
/// (`.damaged-<time>`). New op ids start well past the highest readable one, so that no id a
/// lost op may have shown is given again. Run it while no other cairn uses the database.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    db: DbArgs,
}

pub fn run(args: &Args, _out: &Output) -> Result<(), Failure> {
    let path = &super::sqlite_file(&args.db, "recover", "recovers its own log")?;
    let recovered = store::recover_sqlite(path)
        .with_context(|| format!("cannot recover `{}`", path.display()))?;
    let Some(r) = recovered else {
        crate::output::diagnostic(&format!(
            "nothing to recover: SQLite reads the whole of `{}` and its log; nothing was changed\n",
            path.display()
        ));
        return Ok(());
    };
    let at = if r.first_bad_frame == 0 {
        "in its header".to_owned()
    } else {
        format!("at frame {}", r.first_bad_frame)
    };
    let kept = if r.highest_kept.0 == 0 {
        "no op".to_owned()
    } else {
        format!("ops up to {}", r.highest_kept)
    };
    let copies = r
        .copies
        .iter()
        .map(|c| format!("`{}`", c.display()))
        .collect::<Vec<_>>()
        .join(" and ");
    crate::output::diagnostic(&format!(
        "recovered `{}`: its write-ahead log was damaged {at}\n\
         kept: the {} frames before the damage ({kept})\n\
         dropped: {} committed transaction(s) after it; the ops and changes they recorded are lost\n\
         copies as they were: {copies}\n\
         new op ids start at {}, past every id the dropped transactions may have given\n",
        path.display(),
        r.kept_frames,
        r.dropped_transactions,
        r.next_op
    ));
    Ok(())
}
