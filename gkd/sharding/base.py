"""The sharding interface the sampling engines use, and the replicated case (nothing to do)."""

import contextlib


class ModelSharding:
    """How one model's weights are spread over the processes, as generation sees it."""

    # Every process must enter each generation together, even one without prompts of its own.
    collective = False
    # Generation runs on sharded weights: one generate() call per process, stepping together to the end.
    synced = False

    @contextlib.contextmanager
    def whole_model(self):
        """The model's full weights in this process for the duration of the block (generation, saving)."""
        yield

    @contextlib.contextmanager
    def gathered(self, parameters):
        """These parameters whole in this process for the duration of the block (a layer at a time, for a
        weight sync); every process must enter it together for a sharded model."""
        yield

    def full(self, tensor):
        """A parameter (or state-dict tensor) read inside gathered(): its whole value, without autograd."""
        return tensor.detach()

    @contextlib.contextmanager
    def generating(self):
        """Around one generation: the whole weights, gathered once, unless generation is synced."""
        if self.synced:
            yield
        else:
            with self.whole_model():
                yield


class Replicated(ModelSharding):
    """Every process holds the whole model: generation is local."""
