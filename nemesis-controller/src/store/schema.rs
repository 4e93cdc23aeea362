//! The schema version kept in `meta_v1` and the upgrade steps between versions. Opening
//! a file runs the missing steps in the same write transaction that creates the tables,
//! so a crash mid-upgrade leaves the old version intact. A file newer than this code is
//! refused, never rewritten.

use redb::{ReadableTable, WriteTransaction};

use super::tables::{META, META_SCHEMA_VERSION};
use super::{StoreError, access_error, open_table};

/// The schema this code writes. Bump it together with a new `_vN` table and a step in
/// [`UPGRADES`].
pub const SCHEMA_VERSION: u64 = 2;

/// Moves a file from one version to the next inside the opening write transaction
/// (typically: create the `_v(N+1)` table, copy and convert rows, delete the `_vN` table).
pub type UpgradeStep = fn(&WriteTransaction) -> Result<(), StoreError>;

/// `UPGRADES[i]` upgrades a file from version `i + 1` to `i + 2`.
pub const UPGRADES: &[UpgradeStep] = &[super::log::backfill_log];

/// What opening did to the file's schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Migration {
    /// A new file, stamped with the current version.
    Created,
    /// Already at the current version.
    Current,
    /// Upgraded from the given version.
    Upgraded { from: u64 },
}

/// Brings the file in `txn` to `target` with `steps` (`steps[i]`: `i + 1` -> `i + 2`).
pub(crate) fn migrate(
    txn: &WriteTransaction,
    target: u64,
    steps: &[UpgradeStep],
) -> Result<Migration, StoreError> {
    let found = {
        let meta = open_table(txn, META)?;
        meta.get(META_SCHEMA_VERSION)
            .map_err(access_error(META))?
            .map(|g| g.value())
    };
    let outcome = match found {
        None => Migration::Created,
        Some(v) if v == target => return Ok(Migration::Current),
        Some(v) if v > target => {
            return Err(StoreError::SchemaTooNew {
                found: v,
                supported: target,
            });
        }
        Some(v) => {
            for from in v..target {
                let step = usize::try_from(from - 1)
                    .ok()
                    .and_then(|i| steps.get(i))
                    .ok_or(StoreError::MissingUpgradeStep { from })?;
                step(txn)?;
                tracing::info!(from, to = from + 1, "upgraded history schema");
            }
            Migration::Upgraded { from: v }
        }
    };
    let mut meta = open_table(txn, META)?;
    meta.insert(META_SCHEMA_VERSION, target)
        .map_err(access_error(META))?;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use redb::{Database, TableDefinition};

    use super::*;

    const OLD: TableDefinition<u64, u64> = TableDefinition::new("old_v1");
    const NEW: TableDefinition<u64, u64> = TableDefinition::new("new_v2");

    fn copy_doubled(txn: &WriteTransaction) -> Result<(), StoreError> {
        let old = open_table(txn, OLD)?;
        let mut new = open_table(txn, NEW)?;
        for e in old.iter().unwrap() {
            let (k, v) = e.unwrap();
            new.insert(k.value(), v.value() * 2).unwrap();
        }
        Ok(())
    }

    fn version(db: &Database) -> Option<u64> {
        let txn = db.begin_write().unwrap();
        open_table(&txn, META)
            .unwrap()
            .get(META_SCHEMA_VERSION)
            .unwrap()
            .map(|g| g.value())
    }

    #[test]
    fn an_old_file_runs_each_missing_step_once_and_is_stamped_with_the_new_version() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("h.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        assert_eq!(migrate(&txn, 1, &[]).unwrap(), Migration::Created);
        open_table(&txn, OLD).unwrap().insert(1, 21).unwrap();
        txn.commit().unwrap();

        let txn = db.begin_write().unwrap();
        assert_eq!(
            migrate(&txn, 2, &[copy_doubled]).unwrap(),
            Migration::Upgraded { from: 1 }
        );
        assert_eq!(
            open_table(&txn, NEW)
                .unwrap()
                .get(1)
                .unwrap()
                .unwrap()
                .value(),
            42
        );
        txn.commit().unwrap();
        assert_eq!(version(&db), Some(2));

        let txn = db.begin_write().unwrap();
        assert_eq!(
            migrate(&txn, 2, &[copy_doubled]).unwrap(),
            Migration::Current
        );
    }

    #[test]
    fn a_file_newer_than_the_code_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("h.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        migrate(&txn, 3, &[]).unwrap();
        txn.commit().unwrap();
        let txn = db.begin_write().unwrap();
        let err = migrate(&txn, 2, &[]).unwrap_err();
        assert!(matches!(
            err,
            StoreError::SchemaTooNew {
                found: 3,
                supported: 2
            }
        ));
    }

    #[test]
    fn a_missing_upgrade_step_is_an_error_not_a_silent_stamp() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("h.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        migrate(&txn, 1, &[]).unwrap();
        txn.commit().unwrap();
        let txn = db.begin_write().unwrap();
        assert!(matches!(
            migrate(&txn, 2, &[]).unwrap_err(),
            StoreError::MissingUpgradeStep { from: 1 }
        ));
    }
}
