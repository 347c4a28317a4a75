"""TFRecord files of tf.train.Example images (ImageNet / TFDS layout) as input, read through tfx-bsl's TFXIO."""

from helpers import PHOTO_NAMES, encode, photo, read_embeddings, read_errors, run_pipeline


def _write_examples(path, records):
    import tensorflow as tf

    def feature(value):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value] if value is not None else []))

    with tf.io.TFRecordWriter(str(path)) as writer:
        for features in records:
            example = tf.train.Example(features=tf.train.Features(
                feature={name: feature(value) for name, value in features.items()}))
            writer.write(example.SerializeToString())


def test_tfrecord_examples_are_embedded_under_their_ids(tmp_path, mobilenet_handle):
    for shard in range(2):
        _write_examples(tmp_path / f"train.tfrecord-0000{shard}-of-00002", [
            {"image/encoded": encode(photo(name)[:150, :200], "JPEG"), "image/filename": f"{shard}-{name}.JPEG".encode()}
            for name in PHOTO_NAMES[shard * 3:shard * 3 + 3]
        ])
    out = tmp_path / "out"
    pattern = f"{tmp_path}/train.tfrecord-*"
    assert run_pipeline("--input", pattern, "--output", str(out), "--model_handle", mobilenet_handle) == 0
    table = read_embeddings(str(out))
    expected = sorted(f"{shard}-{name}.JPEG" for shard in range(2) for name in PHOTO_NAMES[shard * 3:shard * 3 + 3])
    assert sorted(table.column("id").to_pylist()) == expected
    assert set(table.column("uri").to_pylist()) == {
        f"{tmp_path}/train.tfrecord-0000{id_[0]}-of-00002#{id_}" for id_ in expected}
    assert read_errors(str(out)).num_rows == 0


def test_feature_names_are_configurable_and_bad_records_are_reported(tmp_path, mobilenet_handle):
    _write_examples(tmp_path / "data.tfrecord", [
        {"jpeg": encode(photo("rocket"), "JPEG"), "key": b"rocket"},
        {"jpeg": b"not an image", "key": b"garbage"},
        {"jpeg": None, "key": b"no-image"},
    ])
    out = tmp_path / "out"
    assert run_pipeline("--input", str(tmp_path / "data.tfrecord"), "--output", str(out), "--model_handle",
                        mobilenet_handle, "--tfrecord_image_feature", "jpeg", "--tfrecord_id_feature", "key") == 0
    assert read_embeddings(str(out)).column("id").to_pylist() == ["rocket"]
    stages = {r["id"]: (r["stage"], r["error"]) for r in read_errors(str(out)).to_pylist()}
    assert stages["garbage"][0] == "decode"
    assert stages["no-image"] == ("manifest", "Record no-image has no 'jpeg' feature.")


def test_duplicate_ids_keep_the_first_record_in_file_order(tmp_path, mobilenet_handle):
    for shard, names in enumerate([("rocket", "chelsea"), ("coffee", "astronaut")]):
        _write_examples(tmp_path / f"d.tfrecord-{shard}", [
            {"image/encoded": encode(photo(name)[:100, :100], "PNG"), "image/filename": b"same"} for name in names])
    out = tmp_path / "out"
    assert run_pipeline("--input", f"{tmp_path}/d.tfrecord-*", "--output", str(out), "--model_handle",
                        mobilenet_handle) == 0
    assert read_embeddings(str(out)).column("uri").to_pylist() == [f"{tmp_path}/d.tfrecord-0#same"]
    messages = sorted(r["error"] for r in read_errors(str(out)).to_pylist())
    first = f"record 0 of {tmp_path}/d.tfrecord-0"
    assert messages == sorted(f"Duplicate id: the record {i} of {tmp_path}/d.tfrecord-{s} repeats the id of the {first}, "
                        f"which is the one embedded." for s, i in ((0, 1), (1, 0), (1, 1)))


def test_a_tfrecord_pattern_that_matches_nothing_is_refused(tmp_path, mobilenet_handle, capsys):
    code = run_pipeline("--input", f"{tmp_path}/none.tfrecord-*", "--output", str(tmp_path / "o"),
                        "--model_handle", mobilenet_handle)
    assert code == 2 and "matches no TFRecord files" in capsys.readouterr().err
