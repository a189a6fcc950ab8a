use super::*;

fn log_with(n: usize) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = AuditLog::open(&path).unwrap();
    for i in 0..n {
        log.record("round.aggregated", "job-1", serde_json::json!({ "round": i + 1 })).unwrap();
    }
    (dir, path)
}

#[test]
fn an_untouched_log_verifies_and_reopens() {
    let (_dir, path) = log_with(5);
    assert_eq!(verify(&path).unwrap().0, 5);
    let log = AuditLog::open(&path).unwrap();
    log.record("job.completed", "job-1", serde_json::json!({})).unwrap();
    assert_eq!(verify(&path).unwrap().0, 6);
}

#[test]
fn every_changed_byte_is_reported_at_its_entry() {
    let (_dir, path) = log_with(6);
    let original = std::fs::read(&path).unwrap();
    let line_starts: Vec<usize> = std::iter::once(0)
        .chain(original.iter().enumerate().filter(|(_, b)| **b == b'\n').map(|(i, _)| i + 1))
        .collect();
    for offset in (0..original.len()).step_by(7) {
        if original[offset] == b'\n' {
            continue;
        }
        let mut bytes = original.clone();
        bytes[offset] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        let entry = line_starts.iter().filter(|&&s| s <= offset).count() as u64;
        match verify(&path) {
            Err(AuditError::Broken { seq, .. }) => assert_eq!(seq, entry, "byte {offset}"),
            other => panic!("byte {offset} changed but verify said {other:?}"),
        }
    }
}

#[test]
fn deleted_entries_are_reported() {
    let (_dir, path) = log_with(4);
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    // Remove entry 2.
    std::fs::write(&path, format!("{}\n{}\n{}\n", lines[0], lines[2], lines[3])).unwrap();
    let err = verify(&path).unwrap_err().to_string();
    assert!(
        err.ends_with("entry 2 (line 2): found entry 3 where entry 2 belongs: entries were deleted or reordered"),
        "{err}"
    );
    // Remove the last entry.
    std::fs::write(&path, format!("{}\n{}\n{}\n", lines[0], lines[1], lines[2])).unwrap();
    let err = verify(&path).unwrap_err().to_string();
    assert!(
        err.ends_with(
            "entry 4 (line 4): the head records 4 entries but the log holds 3: entries were removed from the end"
        ),
        "{err}"
    );
}

#[test]
fn a_daemon_killed_while_recording_reopens_its_log() {
    // Killed after the entry was written but before the head: the head is one behind.
    let (_dir, path) = log_with(3);
    let head = head_path(&path);
    let behind = std::fs::read_to_string(&head).unwrap();
    AuditLog::open(&path).unwrap().record("job.completed", "job-1", serde_json::json!({})).unwrap();
    std::fs::write(&head, &behind).unwrap();
    assert_eq!(verify(&path).unwrap().0, 4, "one entry beyond the head is a crash window, not tampering");
    let log = AuditLog::open(&path).unwrap();
    assert!(std::fs::read_to_string(&head).unwrap().starts_with("4 "), "the head was rolled forward");
    log.record("job.archived", "job-1", serde_json::json!({})).unwrap();
    assert_eq!(verify(&path).unwrap().0, 5);

    // Killed halfway through writing a line: verify says so; opening cuts it off.
    let mut bytes = std::fs::read(&path).unwrap();
    let whole = bytes.len();
    bytes.extend_from_slice(br#"{"seq":6,"at_unix_ms":17"#);
    std::fs::write(&path, &bytes).unwrap();
    let err = verify(&path).unwrap_err().to_string();
    assert!(err.ends_with("entry 6 (line 6): the last line is incomplete: the daemon stopped while writing it, and drops it when it next starts"), "{err}");
    let log = AuditLog::open(&path).unwrap();
    assert_eq!(std::fs::read(&path).unwrap().len(), whole);
    log.record("job.archived", "job-1", serde_json::json!({})).unwrap();
    assert_eq!(verify(&path).unwrap().0, 6);

    // Two entries beyond the head are not a crash: they were added outside the daemon.
    let head_text = std::fs::read_to_string(&head).unwrap();
    let log = AuditLog::open(&path).unwrap();
    log.record("a", "b", serde_json::json!({})).unwrap();
    log.record("c", "d", serde_json::json!({})).unwrap();
    std::fs::write(&head, head_text).unwrap();
    let err = verify(&path).unwrap_err().to_string();
    assert!(
        err.ends_with("the log holds 8 entries, 2 more than its head records: entries were added outside the daemon"),
        "{err}"
    );
    assert!(AuditLog::open(&path).is_err());
}
