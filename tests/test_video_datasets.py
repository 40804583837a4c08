"""Tests of the annotation-format builders, the lazy decode transform and the corrupt-sample collator.

Builder tests read the fixtures in `tests/fixtures/<format>/` (tiny annotation files in the public layouts) and
create empty placeholder video files, since building only checks that files exist; the decoding tests use real
clips from the synthetic generator.
"""

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import ClassLabel

from modeling_stan.data.video_datasets import (
    RETRIEVAL_FEATURES,
    AnnotationError,
    CorruptSampleCounter,
    SkipCorruptCollator,
    build_report,
    load_activitynet_captions,
    load_didemo,
    load_hmdb51,
    load_kinetics,
    load_lsmdc,
    load_msrvtt,
    load_msvd,
    load_something_something_v2,
    load_ucf101,
    load_video_folder,
    load_webvid,
    make_decode_transform,
    unique_video_rows,
)
from modeling_stan.demo.synthetic_videos import DIRECTIONS, generate_synthetic_dataset
from modeling_stan.video_processing_stan import StanVideoProcessor


FIXTURES = Path(__file__).parent / "fixtures"


def _videos(tmp_path: Path, relative_paths: list[str]) -> Path:
    """A video folder holding empty files at `relative_paths`."""
    root = tmp_path / "videos"
    root.mkdir(exist_ok=True)
    for relative in relative_paths:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).touch()
    return root


def _classes(dataset) -> list[str]:
    return [dataset.features["label"].int2str(label) for label in dataset["label"]]


# ------------------------------------------------------------------------------------------------- retrieval


def test_msrvtt_json_split_gives_one_row_per_caption(tmp_path):
    videos = _videos(tmp_path, ["video0.mp4", "video1.mp4", "video2.mp4"])
    dataset = load_msrvtt(FIXTURES / "msrvtt/MSRVTT_data.json", videos, split="train")
    assert dataset.features == RETRIEVAL_FEATURES
    assert dataset["video_id"] == ["video0", "video0", "video1", "video1", "video1"]
    assert dataset["caption"][4] == "a person cuts food with a knife"
    assert dataset["video_index"] == [0, 0, 1, 1, 1]
    assert dataset["video"][0] == str(videos / "video0.mp4")
    assert unique_video_rows(dataset) == [0, 2]


def test_msrvtt_train_list_csv_selects_videos(tmp_path):
    videos = _videos(tmp_path, ["video0.mp4", "video1.mp4", "video2.mp4"])
    dataset = load_msrvtt(
        FIXTURES / "msrvtt/MSRVTT_data.json", videos, video_ids_file=FIXTURES / "msrvtt/MSRVTT_train.9k.csv"
    )
    assert sorted(set(dataset["video_id"])) == ["video0", "video1", "video2"]
    assert len(dataset) == 6


def test_msrvtt_jsfusion_csv_counts_missing_videos(tmp_path, caplog):
    videos = _videos(tmp_path, ["video3.mp4", "video5.mp4"])
    with caplog.at_level(logging.WARNING):
        dataset = load_msrvtt(FIXTURES / "msrvtt/MSRVTT_JSFUSION_test.csv", videos)
    assert dataset["video_id"] == ["video3", "video5"]
    assert dataset["video_index"] == [0, 1]  # renumbered after the drop
    report = build_report(dataset)
    assert (report.format, report.num_rows, report.num_missing_videos) == ("msrvtt", 2, 1)
    assert report.missing_videos == [str(videos / "video4.mp4")]
    assert "1 video(s)" in caplog.text and "video4.mp4" in caplog.text


def test_msrvtt_rejects_unknown_split_and_split_with_csv(tmp_path):
    videos = _videos(tmp_path, [])
    with pytest.raises(ValueError, match="'validate'"):
        load_msrvtt(FIXTURES / "msrvtt/MSRVTT_data.json", videos, split="val")
    with pytest.raises(ValueError, match="JSFusion CSV"):
        load_msrvtt(FIXTURES / "msrvtt/MSRVTT_JSFUSION_test.csv", videos, split="test")


def test_didemo_joins_descriptions_per_video(tmp_path):
    videos = _videos(tmp_path, ["10012345@N04_2345678901_abcdef1234.mp4", "20098765@N00_3456789012_0123456789.mp4"])
    dataset = load_didemo(FIXTURES / "didemo/train_data.json", videos, video_ext=".mp4")
    assert dataset["video_id"] == ["10012345@N04_2345678901_abcdef1234.mov", "20098765@N00_3456789012_0123456789.avi"]
    assert dataset["caption"][0] == "a dog jumps into the water the camera pans to the left the dog swims back"
    assert dataset["video_index"] == [0, 1]
    assert build_report(dataset).num_missing_videos == 1


def test_lsmdc_reads_tab_separated_clips_in_movie_folders(tmp_path):
    videos = _videos(
        tmp_path,
        [
            "0001_Example_Movie/0001_Example_Movie_00.00.51.926-00.00.54.129.avi",
            "0001_Example_Movie/0001_Example_Movie_00.01.02.000-00.01.05.500.avi",
            "1012_Another_Film/1012_Another_Film_01.10.00.100-01.10.03.900.avi",
        ],
    )
    dataset = load_lsmdc(FIXTURES / "lsmdc/LSMDC16_annos_training.csv", videos)
    assert len(dataset) == 3 and build_report(dataset).num_missing_videos == 0
    assert dataset["caption"][1] == 'He looks at the "old" photo.'


def test_lsmdc_names_file_and_line_of_a_bad_row(tmp_path):
    bad = tmp_path / "annos.csv"
    bad.write_text("clip\t1\t2\tonly four fields\n")
    with pytest.raises(AnnotationError, match=r"annos\.csv: line 1: expected 6 tab-separated"):
        load_lsmdc(bad, _videos(tmp_path, []))


def test_msvd_keeps_every_caption_with_its_video_index(tmp_path):
    videos = _videos(tmp_path, ["-4wsuPCjDBc_5_15.avi", "-7KMZQEsJW4_205_208.avi", "04Gt01vatkk_248_265.avi"])
    dataset = load_msvd(FIXTURES / "msvd/AllVideoDescriptions.txt", videos)
    assert len(dataset) == 7
    assert dataset["video_index"] == [0, 0, 0, 1, 1, 2, 2]
    assert unique_video_rows(dataset) == [0, 3, 5]
    train_list = FIXTURES / "msvd/train_list.txt"
    train = load_msvd(FIXTURES / "msvd/AllVideoDescriptions.txt", videos, video_ids_file=train_list)
    assert train["video_index"] == [0, 0, 0, 1, 1]


def test_activitynet_captions_joins_sentences(tmp_path):
    videos = _videos(tmp_path, ["v_QOlSCBRmfWY.mp4", "v_ehGHCYKzyZ8.mp4"])
    dataset = load_activitynet_captions(FIXTURES / "activitynet_captions/train.json", videos)
    assert dataset["caption"] == [
        "A young woman is seen standing in a room. She then begins to dance. She ends by bowing.",
        "A man puts on skates. He skates around the rink.",
    ]


def test_webvid_uses_page_dir_folders(tmp_path):
    videos = _videos(tmp_path, ["006001_006050/1066692580.mp4", "001051_001100/21179416.mp4"])
    dataset = load_webvid(FIXTURES / "webvid/results_2M_val.csv", videos)
    assert dataset["caption"] == ["Aerial view of a coastline, waves at sunset", "Time lapse of clouds over mountains"]
    assert build_report(dataset).num_missing_videos == 1


# -------------------------------------------------------------------------------------------- classification


def test_kinetics_file_names_and_sorted_labels(tmp_path):
    videos = _videos(
        tmp_path,
        ["---QUuC4vJs_000003_000013.mp4", "--nQbRBEz2s_000104_000114.mp4", "-0O4Znnq0zs_000000_000010.mp4"],
    )
    dataset = load_kinetics(FIXTURES / "kinetics/train.csv", videos)
    assert dataset.features["label"].names == ["abseiling", "air drumming", "passing American football (in game)"]
    assert dataset["video_id"] == [
        "---QUuC4vJs_000003_000013",
        "--nQbRBEz2s_000104_000114",
        "-0O4Znnq0zs_000000_000010",
    ]
    assert _classes(dataset) == ["abseiling", "air drumming", "passing American football (in game)"]
    assert build_report(dataset).num_missing_videos == 1


def test_kinetics_test_split_without_labels_and_unknown_label(tmp_path):
    videos = _videos(tmp_path, ["-0Dr1J0-Dfw_000022_000032.mp4", "-1kyG2wXEDM_000005_000015.mp4"])
    test = load_kinetics(FIXTURES / "kinetics/test.csv", videos, class_names=["abseiling", "air drumming"])
    assert test["label"] == [-1, -1] and test.features["label"].num_classes == 2
    with pytest.raises(AnnotationError, match=r"train\.csv: line 3: label 'air drumming'"):
        load_kinetics(FIXTURES / "kinetics/train.csv", videos, class_names=["abseiling"])


def test_something_something_v2_maps_templates_through_labels_json(tmp_path):
    directory = FIXTURES / "something_something_v2"
    labels = directory / "something-something-v2-labels.json"
    videos = _videos(tmp_path, ["78687.webm", "42326.webm", "100904.webm", "1420.webm", "1421.webm"])
    train = load_something_something_v2(directory / "something-something-v2-train.json", labels, videos)
    assert train["label"] == [1, 2, 0]
    assert _classes(train)[0] == "Holding something next to something"
    test = load_something_something_v2(directory / "something-something-v2-test.json", labels, videos)
    assert test["label"] == [-1, -1]


def test_something_something_v2_unknown_template_names_entry(tmp_path):
    annotation = tmp_path / "train.json"
    annotation.write_text(json.dumps([{"id": "7", "template": "Juggling [something]", "placeholders": ["x"]}]))
    labels = FIXTURES / "something_something_v2/something-something-v2-labels.json"
    with pytest.raises(AnnotationError, match=r"train\.json: entry 0 \(id 7\): template 'Juggling something'"):
        load_something_something_v2(annotation, labels, _videos(tmp_path, []))


def test_ucf101_train_and_test_lists(tmp_path):
    split_dir = FIXTURES / "ucf101/ucfTrainTestlist"
    videos = _videos(
        tmp_path,
        [
            "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi",
            "Archery/v_Archery_g08_c02.avi",
            "HandstandPushups/v_HandStandPushups_g08_c01.avi",
            "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi",
            "HandstandPushups/v_HandStandPushups_g01_c01.avi",
        ],
    )
    train = load_ucf101(split_dir, videos, split="train")
    assert train.features["label"].names == ["ApplyEyeMakeup", "Archery", "HandstandPushups"]
    assert train["label"] == [0, 1, 2]
    assert build_report(train).num_missing_videos == 1
    test = load_ucf101(split_dir, videos, split="test")
    assert test["label"] == [0, 2] and test["video_id"][1] == "v_HandStandPushups_g01_c01"
    with pytest.raises(ValueError, match="fold"):
        load_ucf101(split_dir, videos, fold=4)


def test_hmdb51_marks_select_the_split(tmp_path):
    split_dir = FIXTURES / "hmdb51/testTrainMulti_7030_splits"
    videos = _videos(
        tmp_path,
        [
            "brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi",
            "brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_1.avi",
            "cartwheel/Bodenturnen_cartwheel_f_cm_np1_le_med_0.avi",
            "cartwheel/Cartwheel_Tutorial_cartwheel_f_cm_np1_ri_med_1.avi",
            "catch/96-_Torwarttraining_catch_f_cm_np1_ri_bad_0.avi",
            "catch/Ballfangen_catch_u_cm_np1_fr_goo_0.avi",
        ],
    )
    train = load_hmdb51(split_dir, videos, split="train")
    assert train.features["label"].names == ["brush_hair", "cartwheel", "catch"]
    assert _classes(train) == ["brush_hair", "cartwheel", "catch"]
    test = load_hmdb51(split_dir, videos, split="test")
    assert test["video_id"] == [
        "April_09_brush_hair_u_nm_np1_ba_goo_1",
        "Cartwheel_Tutorial_cartwheel_f_cm_np1_ri_med_1",
        "96-_Torwarttraining_catch_f_cm_np1_ri_bad_0",
    ]


def test_video_folder_labels_and_broken_links(tmp_path):
    videos = _videos(tmp_path, ["walk/b.mp4", "walk/a.avi", "run/c.webm", "run/notes.txt"])
    (videos / "run" / "gone.mp4").symlink_to(tmp_path / "nowhere.mp4")
    dataset = load_video_folder(videos)
    assert dataset.features["label"] == ClassLabel(names=["run", "walk"])
    assert dataset["video_id"] == ["c", "a", "b"] and dataset["label"] == [0, 1, 1]
    assert build_report(dataset).num_missing_videos == 1


def test_bad_json_and_missing_video_folder_raise_clear_errors(tmp_path):
    broken = tmp_path / "train.json"
    broken.write_text('{"v_1": {"sentences": ["a",]}}')
    with pytest.raises(AnnotationError, match=r"train\.json: line 1, column \d+: invalid JSON"):
        load_activitynet_captions(broken, _videos(tmp_path, []))
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_webvid(FIXTURES / "webvid/results_2M_val.csv", tmp_path / "does-not-exist")
    no_page_dir = tmp_path / "results.csv"
    no_page_dir.write_text("videoid,contentUrl,duration,name\n1,u,PT00H00M01S,a clip\n")
    with pytest.raises(AnnotationError, match=r"results\.csv: line 1 \(header\).*missing \['page_dir'\]"):
        load_webvid(no_page_dir, _videos(tmp_path, []))


# -------------------------------------------------------------------------------------- decoding and collation


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    return generate_synthetic_dataset(
        tmp_path_factory.mktemp("synthetic") / "data", num_train=8, num_val=4, num_test=4, num_frames=8, size=32
    )


def test_synthetic_dataset_loads_with_msrvtt_and_folder_builders(synthetic_root):
    train = load_msrvtt(synthetic_root / "msrvtt/MSRVTT_data.json", synthetic_root / "videos", split="train")
    assert len(train) == 16 and len(unique_video_rows(train)) == 8
    test = load_msrvtt(synthetic_root / "msrvtt/MSRVTT_JSFUSION_test.csv", synthetic_root / "videos")
    assert len(test) == 4 and len(set(test["caption"])) == 4
    folders = load_video_folder(synthetic_root / "folders/train", class_names=DIRECTIONS)
    assert len(folders) == 8 and build_report(folders).num_missing_videos == 0
    assert all(Path(path).parent.name == DIRECTIONS[label] for path, label in zip(folders["video"], folders["label"]))


def _with_corrupt_videos(synthetic_root: Path, tmp_path: Path):
    """A folder dataset of two good clips and three corrupt ones: truncated, zero bytes, text named .mp4."""
    good = sorted((synthetic_root / "videos").glob("*.mp4"))[:2]
    folder = tmp_path / "clips" / "any"
    folder.mkdir(parents=True)
    for path in good:
        shutil.copy(path, folder / path.name)
    data = good[0].read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (folder / "zero.mp4").write_bytes(b"")
    (folder / "text.mp4").write_text("this is not a video\n")
    return load_video_folder(folder.parent)


def test_decode_transform_marks_corrupt_samples_instead_of_raising(synthetic_root, tmp_path):
    dataset = _with_corrupt_videos(synthetic_root, tmp_path).with_transform(make_decode_transform(num_frames=4))
    batch = dataset[:]
    errors = dict(zip(dataset.with_format(None)["video_id"], batch["decode_error"]))
    assert {name for name, error in errors.items() if error} == {"truncated", "zero", "text"}
    assert all(error.startswith("VideoDecodeError") for error in errors.values() if error)
    frames = [clip for clip in batch["frames"] if clip is not None]
    assert len(frames) == 2 and all(clip.shape == (4, 32, 32, 3) and clip.dtype == np.uint8 for clip in frames)
    assert dataset["label"] == [0] * 5  # a column query passes the transform untouched


def test_collator_skips_and_counts_corrupt_samples(synthetic_root, tmp_path, caplog):
    dataset = _with_corrupt_videos(synthetic_root, tmp_path).with_transform(make_decode_transform(num_frames=4))
    collator = SkipCorruptCollator()
    with caplog.at_level(logging.WARNING):
        batches = list(torch.utils.data.DataLoader(dataset, batch_size=5, collate_fn=collator))
    assert batches[0]["frames"].shape == (2, 4, 32, 32, 3)
    assert "decode_error" not in batches[0]
    assert collator.counter.count == 3 and collator.counter.report() == "3 corrupt video sample(s) skipped"
    assert caplog.text.count("Skipping corrupt video") == 3
    corrupt_only = dataset.filter(lambda video_id: not video_id.startswith("video"), input_columns="video_id")
    assert list(torch.utils.data.DataLoader(corrupt_only, batch_size=3, collate_fn=collator)) == [None]
    assert collator.counter.count == 6


def test_collator_lists_at_most_max_warnings_and_counts_all(synthetic_root, tmp_path, caplog):
    dataset = _with_corrupt_videos(synthetic_root, tmp_path).with_transform(make_decode_transform(num_frames=2))
    collator = SkipCorruptCollator(max_warnings=2)
    with caplog.at_level(logging.WARNING):
        batch, num_corrupt = collator.collate_usable(list(dataset))
    assert (len(batch["frames"]), num_corrupt) == (2, 3)
    assert caplog.text.count("Skipping corrupt video") == 2
    assert caplog.text.count("further ones are counted, not listed") == 1


def test_counter_adds_up_across_dataloader_workers(synthetic_root, tmp_path):
    dataset = _with_corrupt_videos(synthetic_root, tmp_path).with_transform(make_decode_transform(num_frames=2))
    counter = CorruptSampleCounter()
    collator = SkipCorruptCollator(counter=counter)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=2, collate_fn=collator)
    assert sum(batch is not None for batch in loader) == 2
    assert counter.count == 3


def test_decode_transform_with_processor_and_seeded_training_sampling(synthetic_root):
    def processor(clips, return_tensors, do_sample_frames):
        assert return_tensors == "pt" and do_sample_frames is False
        tensors = [torch.from_numpy(clip).permute(0, 3, 1, 2).float() / 255 for clip in clips]
        return {"pixel_values": torch.stack(tensors)}

    dataset = load_video_folder(synthetic_root / "folders/train")
    sampled = [
        dataset.with_transform(make_decode_transform(num_frames=3, train=True, video_processor=processor, seed=7))[:]
        for _ in range(2)
    ]
    assert "frames" not in sampled[0] and sampled[0]["pixel_values"][0].shape == (3, 3, 32, 32)
    for first, second in zip(sampled[0]["pixel_values"], sampled[1]["pixel_values"]):
        torch.testing.assert_close(first, second)


def test_decode_transform_returns_what_the_processor_returns_for_the_video(synthetic_root):
    processor = StanVideoProcessor.for_image_size(24, num_frames=4)  # the 32-pixel videos are resized
    dataset = load_msrvtt(synthetic_root / "msrvtt/MSRVTT_JSFUSION_test.csv", synthetic_root / "videos")
    for num_frames in (4, 8):  # as many frames as the processor's default, and more
        transform = make_decode_transform(num_frames=num_frames, video_processor=processor)
        rows = dataset.with_transform(transform)[:2]
        expected = processor(rows["video"], num_frames=num_frames, return_tensors="pt")["pixel_values"]
        assert torch.equal(torch.stack(rows["pixel_values"]), expected)


# ------------------------------------------------------------------------------------------ annotation errors


def test_a_latin1_annotation_file_is_an_error_naming_file_and_line(tmp_path):
    annotations = tmp_path / "MSRVTT_JSFUSION_test.csv"
    annotations.write_bytes("key,vid_key,video_id,sentence\nk,v,video0,a caf\u00e9 scene\n".encode("latin-1"))
    with pytest.raises(AnnotationError, match=r"MSRVTT_JSFUSION_test\.csv: line 2: not UTF-8 text \(byte 0xe9\)"):
        load_msrvtt(annotations, _videos(tmp_path, ["video0.mp4"]))
    lines = tmp_path / "AllVideoDescriptions.txt"
    lines.write_bytes("# header\nvid1 a caf\u00e9\n".encode("latin-1"))
    with pytest.raises(AnnotationError, match=r"AllVideoDescriptions\.txt: line 2: not UTF-8"):
        load_msvd(lines, _videos(tmp_path, []))
    json_file = tmp_path / "train.json"
    json_file.write_bytes('{"v": {"sentences": ["caf\u00e9"]}}'.encode("latin-1"))
    with pytest.raises(AnnotationError, match=r"train\.json: line 1: not UTF-8"):
        load_activitynet_captions(json_file, _videos(tmp_path, []))


def test_an_unterminated_csv_quote_is_an_error_not_a_swallowed_file(tmp_path):
    annotations = tmp_path / "test.csv"
    annotations.write_text('key,vid_key,video_id,sentence\nk,v,video0,"a caption\nk,v,video1,another\nk,v,video2,x\n')
    with pytest.raises(AnnotationError, match=r"test\.csv: line 2: malformed CSV"):
        load_msrvtt(annotations, _videos(tmp_path, ["video0.mp4", "video1.mp4", "video2.mp4"]))


def test_video_ids_cannot_leave_the_video_folder(tmp_path):
    (tmp_path / "outside.mp4").touch()
    annotations = tmp_path / "test.csv"
    annotations.write_text("key,vid_key,video_id,sentence\nk,v,../outside,a caption\n")
    with pytest.raises(AnnotationError, match=r"test\.csv: video '\.\./outside': its path .* leaves the video folder"):
        load_msrvtt(annotations, _videos(tmp_path, []))


def test_a_byte_order_mark_keeps_the_labels_of_a_kinetics_csv_and_a_json_file(tmp_path):
    """Spreadsheet exports start with a UTF-8 byte-order mark; it must not become part of the first column's name."""
    videos = _videos(
        tmp_path,
        ["---QUuC4vJs_000003_000013.mp4", "--nQbRBEz2s_000104_000114.mp4", "-0O4Znnq0zs_000000_000010.mp4"],
    )
    with_bom = tmp_path / "train.csv"
    with_bom.write_bytes(b"\xef\xbb\xbf" + (FIXTURES / "kinetics/train.csv").read_bytes())
    dataset = load_kinetics(with_bom, videos)
    assert _classes(dataset) == _classes(load_kinetics(FIXTURES / "kinetics/train.csv", videos))
    assert _classes(dataset)[0] == "abseiling"
    didemo = tmp_path / "didemo.json"
    didemo.write_bytes(b"\xef\xbb\xbf" + (FIXTURES / "didemo/train_data.json").read_bytes())
    _videos(tmp_path, ["10012345@N04_2345678901_abcdef1234.mp4"])
    assert len(load_didemo(didemo, videos, video_ext=".mp4")) == 1


def test_no_video_found_names_the_extensions_looked_for(tmp_path):
    # DiDeMo's annotations name .mov/.avi files; transcoded .mp4 videos need --video_ext.
    videos = _videos(tmp_path, ["10012345@N04_2345678901_abcdef1234.mp4", "20098765@N00_3456789012_0123456789.mp4"])
    with pytest.raises(
        FileNotFoundError, match=r"no video found for any annotation .*looked for extensions \.avi, \.mov"
    ):
        load_didemo(FIXTURES / "didemo/train_data.json", videos)
    with pytest.raises(FileNotFoundError, match=r"looked for extension \.webm under"):
        load_kinetics(FIXTURES / "kinetics/train.csv", videos, video_ext=".webm")
    (tmp_path / "folders" / "a").mkdir(parents=True)
    (tmp_path / "folders" / "a" / "clip.txt").touch()
    with pytest.raises(FileNotFoundError, match=r"no video found .*looked for extensions \.mp4"):
        load_video_folder(tmp_path / "folders")
