import torch
import torch.nn.functional as F

from fsvideo.ae.conv import CausalConv3d
from fsvideo.ae.resample import DownBlock, UpBlock, channel_to_space_time, space_time_to_channel


def test_space_time_fold_is_pixel_unshuffle_per_frame_and_invertible():
    x = torch.randn(2, 3, 4, 6, 8)
    folded = space_time_to_channel(x, 1, 2)
    expected = torch.stack([F.pixel_unshuffle(x[:, :, t], 2) for t in range(4)], dim=2)
    assert torch.equal(folded, expected)
    for f in (1, 2):
        assert torch.equal(channel_to_space_time(space_time_to_channel(x, f, 2), f, 2), x)


def test_time_resampling_keeps_the_first_frame_alone():
    down = DownBlock(4, 8, halve_time=True, temporal_kernel_size=3)
    up = UpBlock(8, 4, double_time=True, temporal_kernel_size=3)
    video = torch.randn(1, 4, 9, 8, 8)
    with torch.no_grad():
        latent = down(video)
        assert latent.shape == (1, 8, 5, 4, 4)
        assert up(latent).shape == (1, 4, 9, 8, 8)
        # frame 0 of the output depends on frame 0 of the input only
        changed = video.clone()
        changed[:, :, 1:] = 0
        torch.testing.assert_close(down(changed)[:, :, 0], latent[:, :, 0], atol=1e-6, rtol=0)


def test_strided_causal_conv_windows_end_at_their_own_frame():
    conv = CausalConv3d(1, 1, (3, 1, 1), stride=(2, 1, 1), bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 10.0, 100.0]).view(1, 1, 3, 1, 1))
        frames = torch.arange(1.0, 6.0).view(1, 1, 5, 1, 1)  # x0..x4 = 1..5
        out = conv(frames).flatten().tolist()
    # zero-padded past: [0, 0, x0], then [x0, x1, x2], [x2, x3, x4]
    assert out == [100.0, 1 + 20 + 300, 3 + 40 + 500]
