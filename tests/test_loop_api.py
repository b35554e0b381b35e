"""What training loops need from a pipeline: `output=` / `fields=`, `len()`, states that know their rank and
configuration, one state file per rank, and a clear error for samples of another shape."""

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, TensorDataset

import curate

from .conftest import MapDataset, check_resume, linear_models, make_bucket, make_samples

# ranks given by hand, without a process group: split but not kept in step, which these tests mean
pytestmark = pytest.mark.filterwarnings("ignore:pipeline. rank .* without an initialised torch.distributed")


def _pipe(source, **options):
    learner, reference = linear_models()
    kwargs = dict(learner=learner, reference=reference, scorer=curate.ClassificationScorer(), batch_size=8,
                  filter_ratio=0.8, method="sample", shuffle_buffer=80, seed=3)
    return curate.pipeline(source, **{**kwargs, **options})


# ---------------------------------------------------------------- output= and fields=


def test_output_gives_tuples_of_fields_and_fields_keeps_only_those_and_both_resume_exactly():
    data = make_samples(300)
    plain = list(_pipe(data))
    as_tuples = list(_pipe(data, output=("input", "target")))
    kept = list(_pipe(data, fields=("input", "target")))
    mapped = list(_pipe(data, output=lambda batch: batch["target"].sum()))
    assert len(plain) == len(as_tuples) == len(kept) == len(mapped) == 8
    for batch, pair, only, total in zip(plain, as_tuples, kept, mapped, strict=True):
        assert isinstance(pair, tuple) and len(pair) == 2
        assert torch.equal(pair[0], batch["input"]) and torch.equal(pair[1], batch["target"])
        assert list(only) == ["input", "target"] and torch.equal(only["input"], batch["input"])
        assert int(total) == int(batch["target"].sum())
    check_resume(lambda: _pipe(data, output=("input", "target")), points=[1, 3])


def test_output_and_fields_name_a_missing_field_and_refuse_a_bare_string():
    with pytest.raises(KeyError, match=r"output= names 'image', which the batches do not have; their fields are "
                                       r"\['__key__', 'input', 'target'\]"):
        next(iter(_pipe(make_samples(100), output=("image", "target"))))
    with pytest.raises(TypeError, match=r"fields= takes a sequence of field names, got the string 'input'"):
        _pipe(make_samples(100), fields="input")
    with pytest.raises(ValueError, match="output= names no field"):
        _pipe(make_samples(100), output=())


# ---------------------------------------------------------------- len()


class _Stream(IterableDataset):
    def __init__(self, samples, with_len: bool):
        self.samples, self.with_len = samples, with_len

    def __iter__(self):
        return iter(self.samples)

    def __len__(self):
        if not self.with_len:
            raise TypeError("no length")
        return len(self.samples)


def _sources(data):
    yield "list of samples", data, {}
    yield "list of batches", [torch.utils.data.default_collate(data[i:i + 25]) for i in range(0, len(data), 25)], {}
    yield "DataLoader of samples", DataLoader(MapDataset(data), batch_size=None), {}
    yield "batched DataLoader", DataLoader(MapDataset(data), batch_size=40), {}
    yield "DataLoader dropping its last batch", DataLoader(MapDataset(data), batch_size=64, drop_last=True), {}
    yield "sized IterableDataset", DataLoader(_Stream(data, True), batch_size=32), {}
    yield "drop_last pipeline", data, {"drop_last": True}
    yield "rank 1 of 3, split here", data, {"rank": 1, "world_size": 3}
    sampler = DistributedSampler(MapDataset(data), num_replicas=2, rank=1, shuffle=False)
    yield "DistributedSampler", DataLoader(MapDataset(data), batch_size=20, sampler=sampler), \
        {"rank": 1, "world_size": 2}


@pytest.mark.parametrize("n", [300, 317])
def test_len_is_the_number_of_batches_an_epoch_yields(n):
    data = make_samples(n)
    for name, source, options in _sources(data):
        pipe = _pipe(source, **options)
        assert len(pipe) == pipe.batches_per_epoch == sum(1 for _ in pipe), name


def test_len_of_a_pipeline_whose_source_cannot_say_is_a_type_error_unless_given():
    data = make_samples(200)
    for pipe in (_pipe(DataLoader(_Stream(data, False), batch_size=32)),
                 _pipe(data, keep_keys=[s["__key__"] for s in data[::2]])):
        assert pipe.batches_per_epoch is None
        with pytest.raises(TypeError, match="number of batches per epoch is not known"):
            len(pipe)
    assert len(_pipe(DataLoader(_Stream(data, False), batch_size=32), batches_per_epoch=5)) == 5


# ---------------------------------------------------------------- rank-aware state, a file per rank


def test_a_state_of_another_rank_is_refused_naming_both():
    data = make_samples(300)
    rank0, rank1 = (_pipe(data, rank=r, world_size=2) for r in (0, 1))
    next(iter(rank1))
    with pytest.raises(ValueError, match=r"the state is rank 1 of 2's, this pipeline is rank 0 of 2; load each "
                                         r"rank's own state"):
        rank0.load_state_dict(rank1.state_dict())
    with pytest.raises(ValueError, match="rank 1 of 2's, this pipeline is rank 1 of 3"):
        _pipe(data, rank=1, world_size=3).load_state_dict(rank1.state_dict())
    with pytest.raises(ValueError, match="other options .*batch_size: saved 8, here 16"):
        _pipe(data, rank=1, world_size=2, batch_size=16, superbatch_size=40).load_state_dict(rank1.state_dict())


@pytest.mark.parametrize("where", ["local", "s3"])
def test_save_state_and_load_state_keep_one_file_per_rank(where, tmp_path, request):
    options = {}
    directory = str(tmp_path / "state")
    if where == "s3":
        options = request.getfixturevalue("s3_server")
        make_bucket(options, "states")
        directory = "s3://states/run-1"
    data = make_samples(400)
    pipes = [_pipe(data, rank=r, world_size=2) for r in (0, 1)]
    its = [iter(p) for p in pipes]
    for it in its:
        next(it), next(it)
    paths = [curate.save_state(directory, pipe, storage_options=options) for pipe in pipes]
    assert [p.rsplit("/", 1)[1] for p in paths] == ["pipeline-rank00000-of-00002.pt", "pipeline-rank00001-of-00002.pt"]
    rest = [[b["__key__"] for b in it] for it in its]
    for rank in (0, 1):
        resumed = _pipe(data, rank=rank, world_size=2)
        curate.load_state(directory, resumed, storage_options=options)
        assert [b["__key__"] for b in resumed] == rest[rank] and rest[rank]
    with pytest.raises(FileNotFoundError, match=r"no state for rank 0 of 4 .*it holds the states of rank 0 of 2, "
                                                r"rank 1 of 2\); resume with the number of processes"):
        curate.load_state(directory, _pipe(data, rank=0, world_size=4), storage_options=options)


def test_load_state_runs_no_code_from_the_file(tmp_path):
    class Planted:
        def __reduce__(self):
            return (print, ("planted code ran",))

    pipe = _pipe(make_samples(100))
    path = curate.state_path(tmp_path, 0, 1)
    torch.save({"payload": Planted()}, path)
    with pytest.raises(Exception, match="Weights only load failed"):
        curate.load_state(tmp_path, pipe)


# ---------------------------------------------------------------- samples of another shape


def test_tuple_samples_get_an_error_saying_what_shape_is_expected():
    x, y = torch.randn(50, 8), torch.randint(3, (50,))
    for source in (DataLoader(TensorDataset(x, y), batch_size=10), list(zip(x, y, strict=True))):
        with pytest.raises(TypeError, match=r"curate reads samples as dicts of fields with a string '__key__'.*"
                                            r"return \{'__key__': str\(index\), 'image': input, 'label': target\}"):
            next(iter(_pipe(source)))
