"""Test set-up: 8 simulated CPU devices and parsed absl flags, before JAX initializes."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

# grain worker processes read absl flags; they must count as parsed under pytest.
flags.FLAGS.mark_as_parsed()
