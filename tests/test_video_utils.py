import logging
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from transformers_videorefer import video_utils
from transformers_videorefer.video_utils import LoadedVideo, load_image, load_video, sample_frame_indices, write_video


av = pytest.importorskip("av")

HEIGHT, WIDTH = 48, 64
BLOCK = 16  # frames are a 3x4 grid of 16x16 blocks; the first 6 blocks spell the frame number in binary


def coded_frame(number: int) -> np.ndarray:
    """A frame whose number survives lossy coding: bit k of `number` makes block k white, and it has its own tint."""
    frame = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    for bit in range(12):
        row, col = divmod(bit, WIDTH // BLOCK)
        block = frame[row * BLOCK : (row + 1) * BLOCK, col * BLOCK : (col + 1) * BLOCK]
        block[:] = 255 if bit < 6 and (number >> bit) & 1 else (0, 6 * number % 256, 90)
    return frame


def frame_number(frame: np.ndarray) -> int:
    number = 0
    for bit in range(6):
        row, col = divmod(bit, WIDTH // BLOCK)
        block = frame[row * BLOCK : (row + 1) * BLOCK, col * BLOCK : (col + 1) * BLOCK]
        number |= int(block[4:-4, 4:-4, 0].mean() > 127) << bit
    return number


def coded_frames(count: int) -> np.ndarray:
    return np.stack([coded_frame(number) for number in range(count)])


def reference_indices(num_video_frames, num_frames):
    """The release's loop, transcribed: the middle of each of `num_frames` equal segments, rounded with +1e-6."""
    segment_size = float(num_video_frames - 1) / num_frames
    indices = []
    for i in range(num_frames):
        start = segment_size * i
        end = segment_size * (i + 1)
        indices.append(int(np.round((start + end) / 2 + 1e-6)))
    return indices


@pytest.fixture(scope="module")
def mp4_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_video(path, coded_frames(37), fps=8)
    return path


# ---------------------------------------------------------------- sampling


def test_sampling_matches_the_release_formula():
    pairs = [(n, k) for n in range(1, 70) for k in range(1, 41)]
    pairs += [(10_007, 16), (3_000, 32), (901, 8), (123_457, 16), (2, 1000)]
    for num_video_frames, num_frames in pairs:
        assert sample_frame_indices(num_video_frames, num_frames) == reference_indices(num_video_frames, num_frames)


def test_sampling_by_hand():
    assert sample_frame_indices(1, 4) == [0, 0, 0, 0]
    assert sample_frame_indices(5, 2) == [1, 3]  # segment 2, centres 1 and 3
    assert sample_frame_indices(4, 2) == [1, 2]  # segment 1.5, centres 0.75 and 2.25
    assert sample_frame_indices(2, 4) == [0, 0, 1, 1]  # centres 0.125, 0.375, 0.625, 0.875
    assert sample_frame_indices(3, 2) == [1, 2]  # centres 0.5 and 1.5: exact halves round up, not to even
    assert sample_frame_indices(161, 16) == [5 + 10 * i for i in range(16)]
    assert all(type(index) is int for index in sample_frame_indices(100, 16))


@pytest.mark.parametrize(("num_video_frames", "num_frames"), [(0, 4), (5, 0), (5, 2.0), (True, 3), (-3, 2)])
def test_sampling_rejects_non_positive_counts(num_video_frames, num_frames):
    with pytest.raises(ValueError, match="must be a positive integer"):
        sample_frame_indices(num_video_frames, num_frames)


# ---------------------------------------------------------------- video files


def test_mp4_written_and_read_back(mp4_path):
    loaded = load_video(mp4_path, num_frames=8)
    assert isinstance(loaded, LoadedVideo)
    assert loaded.num_video_frames == 37
    assert (loaded.height, loaded.width) == (HEIGHT, WIDTH)
    assert loaded.frame_indices == reference_indices(37, 8)
    assert [frame_number(frame) for frame in loaded.frames] == loaded.frame_indices
    for index, frame in zip(loaded.frame_indices, loaded.frames, strict=True):
        assert frame.dtype == np.uint8 and frame.shape == (HEIGHT, WIDTH, 3)
        assert np.abs(frame.astype(int) - coded_frame(index)).mean() < 3
    assert loaded.extra_frames == {}


@pytest.mark.skipif("libx264rgb" not in av.codecs_available, reason="this PyAV build has no libx264rgb encoder")
def test_write_video_is_lossless_with_libx264rgb(mp4_path):
    loaded = load_video(str(mp4_path), num_frames=37)
    assert loaded.frame_indices == list(range(37))
    np.testing.assert_array_equal(np.stack(loaded.frames), coded_frames(37))


def test_extra_frames_are_decoded_even_when_not_sampled(mp4_path):
    loaded = load_video(mp4_path, num_frames=4, extra_frame_indices=[36, 0, 7, 36])
    assert not {0, 7, 36} & set(loaded.frame_indices)
    assert list(loaded.extra_frames) == [36, 0, 7]
    for index, frame in loaded.extra_frames.items():
        assert frame.shape == (HEIGHT, WIDTH, 3) and frame_number(frame) == index


def test_short_video_repeats_frames(tmp_path):
    path = tmp_path / "short.mp4"
    write_video(path, list(coded_frames(3)), fps=4)
    loaded = load_video(path, num_frames=8)
    assert loaded.frame_indices == [0, 0, 1, 1, 1, 1, 2, 2]
    assert [frame_number(frame) for frame in loaded.frames] == loaded.frame_indices


def test_mkv_without_a_listed_frame_count_is_counted_by_packets(tmp_path):
    path = tmp_path / "clip.mkv"
    write_video(path, coded_frames(21))
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0  # the packet-counting path is the one under test
    loaded = load_video(path, num_frames=5, extra_frame_indices=[20])
    assert loaded.num_video_frames == 21
    assert [frame_number(frame) for frame in loaded.frames] == reference_indices(21, 5)
    assert frame_number(loaded.extra_frames[20]) == 20


def test_gif(tmp_path):
    path = tmp_path / "clip.gif"
    images = [Image.fromarray(frame) for frame in coded_frames(12)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0)
    loaded = load_video(path, num_frames=4, extra_frame_indices=[11])
    assert loaded.num_video_frames == 12
    assert [frame_number(frame) for frame in loaded.frames] == reference_indices(12, 4)
    assert frame_number(loaded.extra_frames[11]) == 11


def test_mpeg4_fallback_encoder(tmp_path, monkeypatch):
    monkeypatch.setattr(video_utils, "_VIDEO_ENCODERS", video_utils._VIDEO_ENCODERS[-1:])
    path = tmp_path / "clip.avi"
    write_video(path, coded_frames(10))
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.name == "mpeg4"
    loaded = load_video(path, num_frames=10)
    assert [frame_number(frame) for frame in loaded.frames] == list(range(10))
    for number, frame in enumerate(loaded.frames):
        assert np.abs(frame.astype(int) - coded_frame(number)).mean() < 8


@pytest.mark.parametrize("listed_count", [50, 10])
def test_wrong_listed_frame_count_is_corrected_by_decoding(mp4_path, monkeypatch, caplog, listed_count):
    monkeypatch.setattr(video_utils, "_count_video_frames", lambda av, path, name: listed_count)
    with caplog.at_level(logging.WARNING):
        loaded = load_video(mp4_path, num_frames=6, extra_frame_indices=[30])
    assert f"lists {listed_count} frames but 37 decode" in caplog.text
    assert loaded.num_video_frames == 37
    assert loaded.frame_indices == reference_indices(37, 6)
    assert [frame_number(frame) for frame in loaded.frames] == loaded.frame_indices
    assert frame_number(loaded.extra_frames[30]) == 30


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"^videos\[2\]: no such video file or frame folder: .*nope\.mp4"):
        load_video(tmp_path / "nope.mp4", 4, name="videos[2]")


def test_text_file_renamed_mp4(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("not a video at all")
    with pytest.raises(ValueError, match=r"^videos: cannot read video file .*notes\.mp4"):
        load_video(path, 4)


def test_truncated_mp4(mp4_path, tmp_path):
    path = tmp_path / "truncated.mp4"
    path.write_bytes(mp4_path.read_bytes()[: mp4_path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"^videos: cannot read video file .*truncated\.mp4"):
        load_video(path, 4)


def test_truncated_streamable_mp4_fails_while_decoding(tmp_path):
    # with the index at the front (faststart) the file opens, and the cut shows up only while decoding
    path = tmp_path / "faststart.mp4"
    noise = np.random.default_rng(0).integers(0, 256, size=(30, HEIGHT, WIDTH, 3), dtype=np.uint8)
    with av.open(str(path), mode="w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264rgb" if "libx264rgb" in av.codecs_available else "mpeg4", rate=8)
        stream.width, stream.height = WIDTH, HEIGHT
        stream.pix_fmt = "rgb24" if stream.codec_context.name == "libx264rgb" else "yuv420p"
        for frame in noise:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(path.read_bytes()[: int(path.stat().st_size * 0.6)])
    with pytest.raises(ValueError, match=r"^videos: cannot (read|decode) video file .*cut\.mp4"):
        load_video(cut, 4)


def test_video_file_without_frames(tmp_path):
    path = tmp_path / "empty.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        container.start_encoding()
    with pytest.raises(ValueError, match=r"^videos: .*empty\.mp4 has no video stream"):
        load_video(path, 4)


def test_video_stream_without_frames(mp4_path, monkeypatch):
    monkeypatch.setattr(video_utils, "_count_video_frames", lambda av, path, name: 0)
    with pytest.raises(ValueError, match=r"^videos: video file .*clip\.mp4 has no frames"):
        load_video(mp4_path, 4)


def test_extra_frame_index_out_of_range(mp4_path):
    with pytest.raises(ValueError, match=r"^videos\[0\]: frame index 37 is out of range for a video of 37 frames"):
        load_video(mp4_path, 4, extra_frame_indices=[3, 37], name="videos[0]")


def test_extra_frame_index_negative_or_not_an_integer(mp4_path):
    with pytest.raises(ValueError, match=r"^videos: frame index -1 is negative"):
        load_video(mp4_path, 4, extra_frame_indices=[-1])
    with pytest.raises(TypeError, match=r"^videos: frame indices must be integers, got '12'"):
        load_video(mp4_path, 4, extra_frame_indices=["12"])
    with pytest.raises(TypeError, match=r"frame indices must be integers"):
        load_video(mp4_path, 4, extra_frame_indices=[2.0])


# ---------------------------------------------------------------- frame folders and frame lists


def save_frames(folder, names, frames):
    folder.mkdir(exist_ok=True)
    for name, frame in zip(names, frames, strict=True):
        Image.fromarray(frame).save(folder / name)


def test_frame_folder_in_sorted_name_order_ignoring_other_files(tmp_path):
    folder = tmp_path / "frames"
    order = np.random.default_rng(0).permutation(15)
    save_frames(folder, [f"frame_{number:03d}.png" for number in order], coded_frames(15)[order])
    save_frames(folder, [".hidden.png"], [coded_frame(60)])
    (folder / "notes.txt").write_text("not a frame")
    (folder / "directory.png").mkdir()
    loaded = load_video(folder, num_frames=5, extra_frame_indices=[14])
    assert loaded.num_video_frames == 15
    assert [frame_number(frame) for frame in loaded.frames] == reference_indices(15, 5)
    np.testing.assert_array_equal(loaded.extra_frames[14], coded_frame(14))  # PNG is lossless


def test_frame_folder_sorts_names_as_strings_like_the_release(tmp_path):
    folder = tmp_path / "frames"
    save_frames(folder, ["2.jpg", "10.PNG", "1.png"], [coded_frame(2), coded_frame(10), coded_frame(1)])
    loaded = load_video(str(folder), num_frames=3)
    assert [frame_number(frame) for frame in loaded.frames] == [1, 10, 2]


def test_frame_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("x")
    with pytest.raises(ValueError, match=r"^videos\[1\]: frame folder .*empty holds no frame images"):
        load_video(empty, 4, name="videos[1]")
    mixed = tmp_path / "mixed"
    save_frames(mixed, ["a.png", "b.png"], [coded_frame(0), np.zeros((20, 30, 3), dtype=np.uint8)])
    with pytest.raises(ValueError, match=r"^videos: frames differ in size: frame 0 is 48x64 .* frame 1 is 20x30"):
        load_video(mixed, 2)
    broken = tmp_path / "broken"
    save_frames(broken, ["a.png"], [coded_frame(0)])
    (broken / "b.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"^videos\[1\]: cannot read image file .*b\.png"):
        load_video(broken, 2)


def test_list_of_frame_paths(tmp_path):
    folder = tmp_path / "frames"
    names = [f"{number}.png" for number in range(9)]
    save_frames(folder, names, coded_frames(9))
    loaded = load_video([str(folder / name) for name in names], num_frames=3, extra_frame_indices=[8])
    assert loaded.num_video_frames == 9
    assert [frame_number(frame) for frame in loaded.frames] == reference_indices(9, 3)
    np.testing.assert_array_equal(loaded.extra_frames[8], coded_frame(8))
    with pytest.raises(ValueError, match=r"^videos\[0\]: no such image file"):
        load_video([folder / "missing.png"], 1)


def test_lists_of_pil_images_and_arrays():
    frames = coded_frames(6)
    for video in ([Image.fromarray(frame) for frame in frames], list(frames), [torch.from_numpy(f) for f in frames]):
        loaded = load_video(video, num_frames=3, extra_frame_indices=[5])
        assert loaded.frame_indices == reference_indices(6, 3)
        np.testing.assert_array_equal(np.stack(loaded.frames), frames[loaded.frame_indices])
        np.testing.assert_array_equal(loaded.extra_frames[5], frames[5])


def test_numpy_and_torch_videos():
    frames = coded_frames(10)
    expected = frames[reference_indices(10, 4)]
    videos = [
        frames,
        frames.astype(np.float32) / 255,
        frames.astype(np.int64),
        torch.from_numpy(frames),
        torch.from_numpy(frames).permute(0, 3, 1, 2),
        torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255,
    ]
    for video in videos:
        loaded = load_video(video, num_frames=4, extra_frame_indices=[9])
        assert (loaded.num_video_frames, loaded.height, loaded.width) == (10, HEIGHT, WIDTH)
        assert all(frame.dtype == np.uint8 for frame in loaded.frames)
        np.testing.assert_array_equal(np.stack(loaded.frames), expected)
        np.testing.assert_array_equal(loaded.extra_frames[9], frames[9])


def test_in_memory_video_errors():
    with pytest.raises(
        ValueError, match=r"^v: expected a video of shape \[T, H, W, 3\] or \[T, 3, H, W\], got \[4, 48, 64\]"
    ):
        load_video(np.zeros((4, HEIGHT, WIDTH), dtype=np.uint8), 2, name="v")
    with pytest.raises(ValueError, match=r"^v: expected a video of shape"):
        load_video(np.zeros((4, HEIGHT, WIDTH, 4), dtype=np.uint8), 2, name="v")
    with pytest.raises(ValueError, match=r"^v: the video array has no frames"):
        load_video(np.zeros((0, HEIGHT, WIDTH, 3), dtype=np.uint8), 2, name="v")
    with pytest.raises(ValueError, match=r"^v\[\d\]: float pixel values must lie in \[0, 1\]"):
        load_video(np.full((4, HEIGHT, WIDTH, 3), 200.0), 2, name="v")
    with pytest.raises(ValueError, match=r"^v\[\d\]: integer pixel values must lie in \[0, 255\]"):
        load_video(torch.full((4, HEIGHT, WIDTH, 3), 300), 2, name="v")
    with pytest.raises(TypeError, match=r"^v\[\d\]: unsupported pixel dtype bool"):
        load_video(np.zeros((4, HEIGHT, WIDTH, 3), dtype=bool), 2, name="v")
    with pytest.raises(ValueError, match=r"^v: frame index 4 is out of range for a video of 4 frames"):
        load_video(np.zeros((4, HEIGHT, WIDTH, 3), dtype=np.uint8), 2, extra_frame_indices=[4], name="v")
    with pytest.raises(ValueError, match=r"^v: got an empty list of frames"):
        load_video([], 2, name="v")
    with pytest.raises(ValueError, match=r"^v: frames differ in size"):
        load_video([coded_frame(0), np.zeros((HEIGHT, WIDTH + 1, 3), dtype=np.uint8)], 2, name="v")
    with pytest.raises(TypeError, match=r"^v\[1\]: unsupported frame type int"):
        load_video([coded_frame(0), 3], 1, name="v")
    with pytest.raises(TypeError, match=r"^v: unsupported video type dict"):
        load_video({"frames": []}, 2, name="v")


# ---------------------------------------------------------------- images


def test_load_image_forms(tmp_path):
    rgb = coded_frame(5)
    Image.fromarray(rgb).save(tmp_path / "image.png")
    np.testing.assert_array_equal(load_image(tmp_path / "image.png"), rgb)
    np.testing.assert_array_equal(load_image(os.fspath(tmp_path / "image.png")), rgb)
    np.testing.assert_array_equal(load_image(Image.fromarray(rgb)), rgb)
    np.testing.assert_array_equal(load_image(Image.fromarray(rgb).convert("RGBA")), rgb)
    np.testing.assert_array_equal(load_image(torch.from_numpy(rgb).permute(2, 0, 1)), rgb)
    np.testing.assert_array_equal(load_image(rgb.astype(np.float64) / 255), rgb)
    grey = rgb[..., 1]
    np.testing.assert_array_equal(load_image(grey), np.repeat(grey[..., None], 3, axis=-1))
    np.testing.assert_array_equal(load_image(Image.fromarray(grey)), np.repeat(grey[..., None], 3, axis=-1))


def test_load_image_errors(tmp_path):
    with pytest.raises(ValueError, match=r"^images\[3\]: no such image file"):
        load_image(tmp_path / "missing.png", name="images[3]")
    (tmp_path / "fake.jpg").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match=r"^images: cannot read image file .*fake\.jpg"):
        load_image(tmp_path / "fake.jpg")
    with pytest.raises(ValueError, match=r"^images: expected an image of shape \[H, W, 3\], \[3, H, W\] or \[H, W\]"):
        load_image(np.zeros((HEIGHT, WIDTH, 4), dtype=np.uint8))
    with pytest.raises(TypeError, match=r"^images: unsupported image type list"):
        load_image([[0, 1], [1, 0]])


def test_write_video_errors(tmp_path):
    with pytest.raises(ValueError, match="got no frames"):
        write_video(tmp_path / "a.mp4", [])
    with pytest.raises(ValueError, match=r"^frames\[1\]: is 48x65 but frames\[0\] is 48x64"):
        write_video(tmp_path / "a.mp4", [coded_frame(0), np.zeros((HEIGHT, WIDTH + 1, 3), dtype=np.uint8)])
    with pytest.raises(ValueError, match="fps must be a positive integer"):
        write_video(tmp_path / "a.mp4", coded_frames(2), fps=0)


def test_missing_pyav_names_the_pip_extra(mp4_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(ImportError, match=r'^videos\[0\]: .*pip install "transformers-videorefer\[video\]"'):
        load_video(mp4_path, 4, name="videos[0]")
    # in-memory videos do not need it
    assert load_video(coded_frames(3), 2).frame_indices == [1, 2]
