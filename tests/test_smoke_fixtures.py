from llmops_jupyter.stages.data.format import load_dataset


def test_tiny_dataset_fixture(registry, tiny_dataset):
    ds = load_dataset(tiny_dataset.hash, registry)
    assert len(ds.train) == 36 and len(ds.eval) == 12
    ex = ds.train[0]
    assert ex["text"] == ex["prompt"] + ex["completion"]
    assert ex["prompt"].endswith("<|im_start|>assistant\n")
    assert load_dataset("data@latest", registry).version == ds.version
