"""Tests of post-pretraining on streamed WebDataset shards (training/run_pretraining.py, training/pretraining_data.py)
and of evaluating a STAN checkpoint without training (run_retrieval.py --model_name_or_path STAN_DIR --do_train false).

The runs use the tiny default model on generated shards of 16 synthetic videos and 16 stills, 2 samples per shard.
"""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
from conftest import REPO_ROOT, launch_two_processes
from test_training import run  # one in-process runner for the training scripts' tests

from modeling_stan import StanForVideoTextRetrieval
from modeling_stan.demo.synthetic_videos import caption_for, generate_synthetic_dataset, plan_videos
from modeling_stan.video_processing_stan import StanVideoProcessor


sys.path.insert(0, str(REPO_ROOT / "training"))
import pretraining_data  # noqa: E402
import run_classification  # noqa: E402
import run_pretraining  # noqa: E402
import run_retrieval  # noqa: E402


SIZES = {"train": 16, "validation": 8, "test": 8}
DATA = [
    "--synthetic_num_train",
    SIZES["train"],
    "--synthetic_num_val",
    SIZES["validation"],
    "--synthetic_num_test",
    SIZES["test"],
    "--per_device_eval_batch_size",
    8,
    "--seed",
    5,
]
SMALL = [*DATA, "--synthetic_samples_per_shard", 2, "--per_device_train_batch_size", 2]
ENV = {
    **os.environ,
    "ACCELERATE_USE_CPU": "1",
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
}


def trained_keys(dump_dir, rank: int = 0) -> list[dict]:
    with open(dump_dir / f"rank{rank}_samples.jsonl", encoding="utf-8") as file:
        return [json.loads(line) for line in file]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "data"
    generate_synthetic_dataset(
        root, num_train=SIZES["train"], num_val=SIZES["validation"], num_test=SIZES["test"], seed=5
    )
    return root


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, data_dir):
    """One epoch in 2 gloo processes x 2 dataloader workers: 4 streams per source, 2 shards (4 samples) each."""
    root = tmp_path_factory.mktemp("two_processes")
    steps = 2 * SIZES["train"] // (2 * 2)  # two sources, global batch 2 x 2
    completed = launch_two_processes(
        "run_pretraining.py",
        *SMALL,
        "--data_dir",
        data_dir,
        "--output_dir",
        root / "out",
        "--dataloader_num_workers",
        2,
        "--max_steps",
        steps,
        "--shuffle_buffer_size",
        3,
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--debug_dump_dir",
        root / "dump",
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return root


# ----------------------------------------------------------------------------------------------------------------
# Data pieces
# ----------------------------------------------------------------------------------------------------------------


def test_shard_patterns_expand_braces_and_globs_and_name_missing_files(tmp_path):
    for name in ("a-000.tar", "a-001.tar", "a-002.tar"):
        (tmp_path / name).write_bytes(b"")
    assert pretraining_data.expand_shards(str(tmp_path / "a-{000..001}.tar")) == [
        str(tmp_path / "a-000.tar"),
        str(tmp_path / "a-001.tar"),
    ]
    assert len(pretraining_data.expand_shards(str(tmp_path / "a-*.tar"))) == 3
    assert pretraining_data.expand_shards("https://host/b-{0..1}.tar") == [
        "https://host/b-0.tar",
        "https://host/b-1.tar",
    ]
    with pytest.raises(FileNotFoundError, match="a-003.tar"):
        pretraining_data.expand_shards(str(tmp_path / "a-{002..003}.tar"))


def test_sources_are_sized_from_stats_files_or_flags(tmp_path, caplog):
    for shard, successes in (("00000", 5), ("00001", 7)):
        tarfile.open(tmp_path / f"{shard}.tar", "w").close()  # a complete tar: taken at its stats' word
        (tmp_path / f"{shard}_stats.json").write_text(json.dumps({"successes": successes}))
    sources = pretraining_data.parse_sources([f"web={tmp_path}/{{00000..00001}}.tar"], None)
    assert [(s.name, s.num_samples, len(s.files)) for s in sources] == [("web", 12, 2)]
    # A declared size that disagrees with the stats is a warning with both numbers; an epoch never holds more
    # samples than the shards (it would repeat some).
    assert pretraining_data.parse_sources([f"web={tmp_path}/00000.tar"], [100])[0].num_samples == 5
    assert "--train_num_samples gives 100 samples for source 'web', but its shards' _stats.json files declare 5" in (
        caplog.text
    )
    assert pretraining_data.parse_sources([f"web={tmp_path}/00000.tar"], [3])[0].num_samples == 3
    assert "gives 3 samples for source 'web', but its shards' _stats.json files declare 5: an epoch uses 3" in (
        caplog.text
    )
    assert pretraining_data.parse_sources([f"web={tmp_path}/00000.tar"], [5])[0].num_samples == 5
    (tmp_path / "00001_stats.json").unlink()
    with pytest.raises(ValueError, match="--train_num_samples"):
        pretraining_data.parse_sources([f"web={tmp_path}/00001.tar"], None)


def test_mixing_follows_source_sizes_or_weights():
    sources = [pretraining_data.ShardSource("video", [], 100), pretraining_data.ShardSource("image", [], 300)]
    # MetaLoader rule: every full global batch of every source.
    assert pretraining_data.batches_per_epoch(sources, 10, None) == [10, 30]
    # Weights 1:1: the smaller source is used once, the larger subsampled to as many batches.
    assert pretraining_data.batches_per_epoch(sources, 10, [1, 1]) == [10, 10]
    assert pretraining_data.batches_per_epoch(sources, 10, [1, 0]) == [10, 0]
    with pytest.raises(ValueError, match="--source_weights"):
        pretraining_data.batches_per_epoch(sources, 10, [1])
    order = pretraining_data.source_order([10, 30], seed=1, epoch=0)
    assert sorted(order.tolist()) == [0] * 10 + [1] * 30
    assert (order == pretraining_data.source_order([10, 30], seed=1, epoch=0)).all()
    assert not (order == pretraining_data.source_order([10, 30], seed=1, epoch=1)).all()


def test_unreadable_samples_are_skipped_and_counted(tmp_path, data_dir):
    videos = plan_videos(num_train=4, num_val=0, num_test=0, size=64, seed=5)
    patterns = pretraining_data.write_synthetic_shards(tmp_path, videos, data_dir / "videos", samples_per_shard=8)
    shard = tmp_path / "videos" / "00000.tar"
    with tarfile.open(shard, "a") as tar:  # a truncated video and a video without caption
        for name, data in (
            ("broken.mp4", b"\x00\x00\x00 ftypisom not a video"),
            ("broken.txt", b"a caption"),
            ("nocaption.mp4", (data_dir / "videos" / "video0.mp4").read_bytes()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    decoder = pretraining_data.ClipDecoder(StanVideoProcessor.for_image_size(32, 4), 4, (0.5, 1.0))
    stream = pretraining_data.ShardStream(
        pretraining_data.expand_shards(patterns["videos"]),
        index=0,
        num_streams=1,
        epoch=0,
        seed=0,
        buffer_size=8,
        batch_size=3,
        decode=decoder,
    )
    batches = list(stream)
    assert sum(len(batch["keys"]) for batch in batches) == 4
    assert sum(batch["corrupt"] for batch in batches) == 2
    assert batches[0]["pixel_values"].shape == (3, 4, 3, 32, 32)
    images = pretraining_data.ShardStream(
        pretraining_data.expand_shards(patterns["images"]),
        index=0,
        num_streams=1,
        epoch=0,
        seed=0,
        buffer_size=8,
        batch_size=4,
        decode=decoder,
    )
    assert next(iter(images))["pixel_values"].shape == (4, 1, 3, 32, 32)  # images are 1-frame clips


def test_a_data_position_is_refused_on_another_layout():
    def loader(num_processes, streams):
        return pretraining_data.MixedStreamLoader(
            [pretraining_data.ShardSource("web", [], 8)],
            [2],
            make_stream=None,
            streams_per_process=streams,
            num_workers=0,
            process_index=0,
            num_processes=num_processes,
            seed=0,
            tokenize=None,
            device="cpu",
        )

    state = loader(1, 2).state_dict()
    with pytest.raises(ValueError, match="1 process\\(es\\) x 2 stream"):
        loader(1, 3).load_state_dict(state)
    restored = loader(1, 2)
    restored.load_state_dict(state)
    assert restored.local_state() == loader(1, 2).local_state()


# ----------------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------------


def test_two_processes_see_every_sample_of_an_epoch_exactly_once(two_process_run):
    records = [record for rank in (0, 1) for record in trained_keys(two_process_run / "dump", rank)]
    for source, prefix in (("videos", "video"), ("images", "image")):
        keys = [key for record in records if record["source"] == source for key in record["keys"]]
        assert sorted(keys) == sorted(f"{prefix}{i}" for i in range(SIZES["train"])), source
    # Each step takes its batch from one source, the same on both processes.
    by_rank = [
        {record["batch"]: record["source"] for record in trained_keys(two_process_run / "dump", rank)}
        for rank in (0, 1)
    ]
    assert by_rank[0] == by_rank[1] and set(by_rank[0].values()) == {"videos", "images"}
    results = json.loads((two_process_run / "out" / "all_results.json").read_text())
    assert results["train"]["sources"] == {
        "videos": {"samples_seen": 16, "corrupt_samples": 0, "lost_samples": 0, "damaged_shards": {}},
        "images": {"samples_seen": 16, "corrupt_samples": 0, "lost_samples": 0, "damaged_shards": {}},
    }
    assert "t2v_R@1" in results["test"]
    model = StanForVideoTextRetrieval.from_pretrained(two_process_run / "out")
    assert model.config.stan_depth == 1


def test_a_killed_stream_resumes_with_the_samples_of_an_uninterrupted_run(tmp_path, data_dir):
    """Checkpoints every 3 steps; the run is killed once checkpoint-6 exists (mid-epoch: 16 steps per epoch) and
    resumed; the steps after the checkpoint train on the same samples as an uninterrupted run, across the epoch end."""
    common = [
        *SMALL,
        "--data_dir",
        data_dir,
        "--dataloader_num_workers",
        2,
        "--shuffle_buffer_size",
        3,
        "--max_steps",
        18,
        "--eval_strategy",
        "no",
        "--save_strategy",
        "steps",
        "--save_steps",
        3,
    ]
    run(run_pretraining, tmp_path / "reference", *common, "--debug_dump_dir", tmp_path / "reference_dump")
    reference = {(r["epoch"], r["batch"]): r["keys"] for r in trained_keys(tmp_path / "reference_dump")}

    output = tmp_path / "out"
    command = [
        sys.executable,
        str(REPO_ROOT / "training" / "run_pretraining.py"),
        "--output_dir",
        str(output),
        *map(str, common),
    ]
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (output / "checkpoints" / "checkpoint-6").is_dir():
            assert process.poll() is None, "the run ended before checkpoint-6"
            assert time.monotonic() < deadline, "checkpoint-6 was never written"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    run(
        run_pretraining,
        output,
        *common,
        "--resume_from_checkpoint",
        "latest",
        "--debug_dump_dir",
        tmp_path / "resumed_dump",
    )
    resumed = trained_keys(tmp_path / "resumed_dump")
    assert resumed[0]["batch"] >= 6 and resumed[0]["epoch"] == 0
    assert {(r["epoch"], r["batch"]) for r in resumed} >= {(1, 0), (1, 1)}  # crossed into the next epoch
    assert {(r["epoch"], r["batch"]): r["keys"] for r in resumed} == {
        position: keys for position, keys in reference.items() if position >= (0, resumed[0]["batch"])
    }


def test_zero_shot_retrieval_from_a_post_pretrained_checkpoint(tmp_path, two_process_run, data_dir):
    checkpoint = two_process_run / "out"
    results = run(
        run_retrieval,
        tmp_path / "eval",
        "--model_name_or_path",
        checkpoint,
        "--do_train",
        "false",
        "--data_dir",
        data_dir,
        *DATA,
    )
    assert set(results) == {"validation", "test"}
    assert 0 <= results["test"]["t2v_R@1"] <= 100 and "qbnorm_t2v_R@1" in results["test"]
    assert json.loads((tmp_path / "eval" / "all_results.json").read_text())["test"] == results["test"]
    assert not (tmp_path / "eval" / "checkpoints").exists()
    # The checkpoint's STAN fields are used; a flag contradicting them is refused.
    with pytest.raises(ValueError, match="stan_depth 3 .*checkpoint has 1"):
        run(
            run_retrieval,
            tmp_path / "eval2",
            "--model_name_or_path",
            checkpoint,
            "--do_train",
            "false",
            "--data_dir",
            data_dir,
            *DATA,
            "--stan_depth",
            3,
        )


def test_classification_fine_tunes_from_a_post_pretrained_checkpoint(tmp_path, two_process_run, data_dir):
    """The towers come from the dual encoder; the head is new, sized by the data's labels, of the requested type."""
    results = run(
        run_classification,
        tmp_path / "out",
        "--model_name_or_path",
        two_process_run / "out",
        "--data_dir",
        data_dir,
        *DATA,
        "--classifier_type",
        "class_embeddings",
        "--max_steps",
        1,
        "--per_device_train_batch_size",
        4,
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
    )
    assert 0 <= results["test"]["top1"] <= 100
    model = run_classification.StanForVideoClassification.from_pretrained(tmp_path / "out")
    assert (model.config.classifier_type, model.config.num_labels, model.config.stan_depth) == (
        "class_embeddings",
        4,
        1,
    )


def test_options_of_the_command_line_and_its_config_file_count_as_given(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("stan_depth: 2\nalignment: mug\n")
    command_line = run_pretraining.PretrainingScript.command_line
    (model, _, task, training), given = command_line.parse_with_given(
        ["--config", str(config), "--do-train", "false", "--seed=3"]
    )
    assert given == {"config", "stan_depth", "alignment", "do_train", "seed"}
    # The config file read once still sets its options, under the flags.
    assert (model.stan_depth, task.alignment, training.do_train, training.seed) == (2, "mug", False, 3)


# ----------------------------------------------------------------------------------------------------------------
# Damaged shards (video2dataset's layout: 00000.tar + 00000_stats.json + 00000.parquet, members <key>.json, .mp4,
# .txt; 16 videos in 4 shards of 4)
# ----------------------------------------------------------------------------------------------------------------


def video2dataset_shards(folder, data_dir) -> str:
    videos = [
        video for video in plan_videos(num_train=16, num_val=8, num_test=8, size=64, seed=5) if video.split == "train"
    ]
    samples = [
        (
            f"{i // 4:05d}{i % 4:04d}",  # video2dataset's keys: shard number, then the sample's number in it
            {
                "mp4": (data_dir / "videos" / f"{video.video_id}.mp4").read_bytes(),
                "txt": caption_for(video.shape, video.colour, video.direction),
            },
        )
        for i, video in enumerate(videos)
    ]
    return pretraining_data.write_shards(folder, samples, samples_per_shard=4)


def members(shard) -> list[tarfile.TarInfo]:
    with tarfile.open(shard) as tar:
        return tar.getmembers()


def cut_at_member(shard, name: str) -> None:
    """Truncates `shard` just before member `name`'s header: a 512-byte boundary, so it reads as a complete tar."""
    offset = next(member.offset for member in members(shard) if member.name == name)
    os.truncate(shard, offset)


def cut_inside_member(shard, name: str) -> None:
    member = next(member for member in members(shard) if member.name == name)
    os.truncate(shard, member.offset_data + member.size // 2)


def keys_of(shard) -> list[str]:
    return sorted({member.name.split(".")[0] for member in members(shard)})


def test_shards_in_video2dataset_layout_are_checked_against_their_stats(tmp_path, data_dir):
    pattern = video2dataset_shards(tmp_path / "web", data_dir)
    shard = tmp_path / "web" / "00001.tar"
    assert sorted(p.name for p in (tmp_path / "web").glob("00001*")) == [
        "00001.parquet",
        "00001.tar",
        "00001_stats.json",
    ]
    assert [m.name for m in members(shard)[:3]] == ["000010000.json", "000010000.mp4", "000010000.txt"]
    stats = json.loads((tmp_path / "web" / "00001_stats.json").read_text())
    assert {"count", "successes", "failed_to_download", "failed_to_subsample", "status_dict"} <= set(stats)
    assert pretraining_data.check_shard(str(shard), 4).damage is None

    def check(cut, name):
        damaged = tmp_path / f"{cut.__name__}-{name}.tar"
        damaged.write_bytes(shard.read_bytes())
        cut(damaged, name)
        result = pretraining_data.check_shard(str(damaged), 4)
        read = list(pretraining_data.read_shards([(str(damaged), result.readable)]))
        assert [sample["__key__"] for sample in read] == keys_of(shard)[: result.readable]
        assert all(set(sample) == {"__key__", "__url__", "json", "mp4", "txt"} for sample in read)
        return result

    # Cut between two samples: Python's tarfile reads the rest without an error, the marker check finds it.
    boundary = check(cut_at_member, "000010002.json")
    assert (boundary.readable, boundary.lost_samples) == (2, 2) and "member boundary" in boundary.damage
    # Cut between the video and the caption of a sample: that sample is incomplete, so lost too.
    within = check(cut_at_member, "000010002.txt")
    assert (within.readable, within.lost_samples) == (2, 2)
    middle = check(cut_inside_member, "000010002.mp4")
    assert (middle.readable, middle.lost_samples) == (2, 2)
    assert "cut inside member '000010002.mp4'" in middle.damage
    first = check(cut_inside_member, "000010000.json")
    assert (first.readable, first.lost_samples) == (0, 4)
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(shard.read_bytes()[: members(shard)[3].offset] + b"<html>not found</html>" * 100)
    assert pretraining_data.check_shard(str(garbage), 4).readable == 1
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    assert pretraining_data.check_shard(str(empty), 4).lost_samples == 4
    assert pretraining_data.expand_shards(pattern)[1] == str(shard)


def test_a_shard_damaged_while_streamed_is_skipped_from_there_and_named(tmp_path, data_dir, caplog):
    """Remote shards are not checked before the run: the stream meets the damage and stops that shard there."""
    video2dataset_shards(tmp_path / "web", data_dir)
    shard, intact = tmp_path / "web" / "00001.tar", tmp_path / "web" / "00002.tar"
    expected = keys_of(shard)[:2] + keys_of(intact)
    cut_inside_member(shard, "000010002.mp4")
    read = list(pretraining_data.read_shards([(str(shard), None), (str(intact), None)]))
    assert [sample["__key__"] for sample in read] == expected
    assert f"Shard {shard} is damaged after 2 sample(s) (ReadError" in caplog.text


@pytest.mark.parametrize("cut", ["boundary", "mid-member"])
def test_a_run_with_a_cut_shard_completes_counts_and_names_the_lost_samples(tmp_path, data_dir, caplog, cut):
    """Two epochs of the 14 readable samples: each seen exactly once per epoch, the 2 lost ones never."""
    pattern = video2dataset_shards(tmp_path / "web", data_dir)
    shard = tmp_path / "web" / "00001.tar"
    all_keys = [key for path in pretraining_data.expand_shards(pattern) for key in keys_of(path)]
    if cut == "boundary":
        cut_at_member(shard, "000010002.json")
    else:
        cut_inside_member(shard, "000010002.mp4")
    results = run(
        run_pretraining,
        tmp_path / "out",
        *DATA,
        "--data_dir",
        data_dir,
        "--train_shards",
        f"webvid={pattern}",
        "--per_device_train_batch_size",
        2,
        "--dataloader_num_workers",
        2,
        "--shuffle_buffer_size",
        3,
        "--max_steps",
        14,
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--debug_dump_dir",
        tmp_path / "dump",
    )
    source = results["train"]["sources"]["webvid"]
    assert source["lost_samples"] == results["train"]["lost_samples"] == 2
    assert list(source["damaged_shards"]) == [str(shard)] and source["damaged_shards"][str(shard)]["lost_samples"] == 2
    assert (
        json.loads((tmp_path / "out" / "all_results.json").read_text())["train"]["sources"]
        == results["train"]["sources"]
    )
    assert f"shard {shard} is damaged" in caplog.text and "2 sample(s) are lost" in caplog.text
    readable = sorted(set(all_keys) - {"000010002", "000010003"})
    records = trained_keys(tmp_path / "dump")
    for epoch in (0, 1):
        keys = [key for record in records if record["epoch"] == epoch for key in record["keys"]]
        assert sorted(keys) == readable, epoch  # every readable sample once, none repeated


def test_two_cut_shards_below_the_usable_fraction_fail_naming_them(tmp_path, data_dir):
    pattern = video2dataset_shards(tmp_path / "web", data_dir)
    cut_at_member(tmp_path / "web" / "00001.tar", "000010002.json")
    cut_inside_member(tmp_path / "web" / "00002.tar", "000020002.mp4")
    # 12 of 16 samples readable: 75%, below the default --min_usable_sample_fraction 0.8.
    with pytest.raises(run_pretraining.UnusableTrainingDataError) as failure:
        run(run_pretraining, tmp_path / "out", *DATA, "--data_dir", data_dir, "--train_shards", f"webvid={pattern}")
    message = str(failure.value)
    assert "source 'webvid': only 12 of its 16 samples (75%) can be read" in message
    assert str(tmp_path / "web" / "00001.tar") in message and str(tmp_path / "web" / "00002.tar") in message
