import struct

from lightning._log import AppendLog, LogReader


def test_append_iterate_and_reopen(tmp_path):
    log = AppendLog(tmp_path / "l", segment_bytes=100)
    recs = [bytes([i]) * (i * 7 % 50 + 1) for i in range(40)]
    for r in recs:
        log.append(r)
    assert list(log) == recs
    assert len(list((tmp_path / "l").glob("*.log"))) > 1  # rotated
    log.close()
    log2 = AppendLog(tmp_path / "l", segment_bytes=100)
    assert list(log2) == recs
    log2.append(b"more")
    assert list(log2)[-1] == b"more"
    log2.close()


def test_torn_tail_is_truncated(tmp_path):
    log = AppendLog(tmp_path / "l")
    for i in range(5):
        log.append(b"x%d" % i)
    log.close()
    seg = next((tmp_path / "l").glob("*.log"))
    with open(seg, "ab") as f:  # half a record: header promises 100 bytes, 3 arrive
        f.write(struct.pack("<II", 100, 0) + b"abc")
    log = AppendLog(tmp_path / "l")
    assert log.truncated_bytes == 11
    assert list(log) == [b"x%d" % i for i in range(5)]
    log.append(b"after")
    assert list(log)[-1] == b"after"
    log.close()


def test_corrupt_record_stops_replay_there(tmp_path):
    log = AppendLog(tmp_path / "l")
    for i in range(3):
        log.append(b"rec%d" % i)
    log.close()
    seg = next((tmp_path / "l").glob("*.log"))
    data = bytearray(seg.read_bytes())
    data[-1] ^= 0xFF  # flip a bit in the last payload
    seg.write_bytes(bytes(data))
    log = AppendLog(tmp_path / "l")
    assert list(log) == [b"rec0", b"rec1"]
    log.close()


def test_reader_follows_writer(tmp_path):
    log = AppendLog(tmp_path / "l", segment_bytes=64)
    reader = LogReader(log)
    seen = []
    n = 0
    for round_ in range(20):
        for _ in range(round_ % 4):
            log.append(b"%05d" % n)
            n += 1
        seen += reader.read(max_records=3, max_bytes=1 << 20)
    while True:
        more = reader.read(max_records=100, max_bytes=1 << 20)
        if not more:
            break
        seen += more
    assert seen == [b"%05d" % i for i in range(n)]
    reader.close()
    log.reset()
    assert list(log) == []
    log.close()
