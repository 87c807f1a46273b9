"""``passes``: the network run again on its own warped result and the flows composed (a cascade), on the
Registrar, the CLI and batch settings."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is needed for the registrar")

torch.set_num_threads(1)

GRID = (16, 16, 16)
SHIFT = 1.5  # voxels along axis 0, the stub network's answer on every pass


@pytest.fixture
def shifting(stub_runner):
    """A stub network whose flow is a uniform shift along axis 0; it records the moving images it is fed."""

    class Recorder(stub_runner):
        def _infer(self, feed):
            self.fed.append(feed["moving"][0, 0].copy())
            return super()._infer(feed)

    flow = np.zeros((3, *GRID), np.float32)
    flow[0] = SHIFT
    runner = Recorder(flow, spacing=4.0)
    runner.fed = []
    return runner


def test_two_passes_compose_the_flows_and_feed_the_warped_image(shifting, pair_in_one_space):
    """Pass 2 sees the moving image warped by pass 1's flow; the result is the composition (two uniform
    shifts add up inside the grid), and qc.json records the passes and both inferences' latency."""
    from emorph_deploy.registration import Registrar

    fixed, moving = pair_in_one_space
    reg = Registrar(shifting, affine=False, warmup=False, match_contrast=False)
    one = reg.register(fixed, moving, refine=0)
    assert len(shifting.fed) == 1 and one.qc["passes"] == 1
    shifting.fed.clear()
    two = reg.register(fixed, moving, refine=0, passes=2)
    assert two.qc["passes"] == 2 and len(shifting.fed) == 2
    first_in, second_in = shifting.fed
    expect = np.zeros(GRID, np.float32)  # moving(x + SHIFT) along axis 0, linear interpolation
    expect[:-2] = 0.5 * first_in[1:-1] + 0.5 * first_in[2:]
    np.testing.assert_allclose(second_in[2:-3], expect[2:-3], atol=1e-5)
    voxel = np.asanyarray(two.displacement.dataobj)  # ITK LPS mm: axis 0 (RAS x) is negated
    inner = voxel[4:-4, 4:-4, 4:-4, 0, 0]
    np.testing.assert_allclose(-inner, 2 * SHIFT * 4.0, atol=1e-3)
    reg3 = Registrar(shifting, affine=False, warmup=False, match_contrast=False, passes=3)
    assert reg3.register(fixed, moving, refine=0).qc["passes"] == 3
    assert reg.register(fixed, moving, refine=0, network=False).qc["passes"] == 0


@pytest.mark.parametrize("bad", [0, -1, 5, 1.5, True, "2"])
def test_bad_passes_are_input_errors(shifting, bad, pair_in_one_space):
    from emorph_deploy.errors import InputError
    from emorph_deploy.registration import Registrar

    with pytest.raises(InputError, match="passes: expected an integer from 1 to 4"):
        Registrar(shifting, affine=False, warmup=False, passes=bad)
    reg = Registrar(shifting, affine=False, warmup=False)
    fixed, moving = pair_in_one_space
    with pytest.raises(InputError, match="passes"):
        reg.register(fixed, moving, refine=0, passes=bad)
    assert shifting.fed == []  # refused before any inference


def test_batch_settings_record_the_passes(shifting, tmp_path):
    from emorph_deploy.registration import Registrar
    from emorph_deploy.registration.batch import PairOptions
    from emorph_deploy.registration.batch_manifest import batch_settings

    one = batch_settings(Registrar(shifting, affine=False, warmup=False), PairOptions())
    two = batch_settings(Registrar(shifting, affine=False, warmup=False, passes=2), PairOptions())
    assert one["passes"] == 1 and two["passes"] == 2
