"""Named inputs (token ids and masks), Hugging Face transformers, text data, INT8 modes."""

import json

import numpy as np
import onnx
import pytest
import torch
from torch.utils.data import DataLoader

import compressor as cz
from compressor.cli import main
from compressor.errors import DataError, UserError
from compressor.inputs import cat, check_inputs, feeds, repeat_to, rows, take
from compressor.runtime.measure import onnx_predictor, torch_predictor
from compressor.sources.data_specs import DataOptions, load_data
from compressor.sources.text_data import (
    PACKAGES,
    TextDataset,
    WordVocab,
    read_tsv,
    split,
    stdlib_docs,
)
from compressor.training.loop import fit_baseline

transformers = pytest.importorskip("transformers")

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]


def sentences(count, seed):
    """Sentences whose label is which of three cue words they hold, among noise words."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(count):
        label = int(torch.randint(3, (1,), generator=g))
        noise = [
            WORDS[3 + int(i)]
            for i in torch.randint(5, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g)
        ]
        where = int(torch.randint(len(noise) + 1, (1,), generator=g))
        noise.insert(where, WORDS[label])
        samples.append((" ".join(noise), label))
    return samples


def text_loaders(length=16):
    train, val = sentences(512, 0), sentences(96, 1)
    vocab = WordVocab([t for t, _ in train], size=32)
    return (
        DataLoader(TextDataset(train, vocab, length), batch_size=32, shuffle=True),
        DataLoader(TextDataset(val, vocab, length), batch_size=32),
        vocab,
    )


def tiny_bert(vocab, kind="bert"):
    torch.manual_seed(0)
    if kind == "bert":
        config = transformers.BertConfig(
            vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64, num_labels=3,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
    else:
        config = transformers.DistilBertConfig(
            vocab_size=len(vocab), dim=32, n_layers=2, n_heads=4, hidden_dim=64,
            max_position_embeddings=64, num_labels=3, dropout=0.0, attention_dropout=0.0,
        )  # fmt: skip
    return transformers.AutoModelForSequenceClassification.from_config(config)


def test_named_inputs_slice_join_and_feed_by_name():
    batch = {"input_ids": torch.arange(12).view(4, 3), "attention_mask": torch.ones(4, 3)}
    assert rows(batch) == 4
    assert take(batch, 1, 3)["input_ids"].tolist() == [[3, 4, 5], [6, 7, 8]]
    assert rows(cat([batch, take(batch, 0, 1)])) == 5
    assert rows(repeat_to(take(batch, 0, 3), 7)) == 7
    fed = feeds(batch, ["attention_mask", "input_ids"])
    assert fed["input_ids"].dtype == np.int64 and fed["attention_mask"].dtype == np.float32
    with pytest.raises(DataError, match=r"inputs \['input_ids'\] differ from the data's"):
        feeds(batch, ["input_ids"])
    with pytest.raises(DataError, match="share one non-zero batch size"):
        check_inputs({"a": torch.zeros(2, 3), "b": torch.zeros(3, 3)})
    with pytest.raises(DataError, match="a tensor with a batch axis under a str key"):
        check_inputs({"a": [1, 2]})
    with pytest.raises(DataError, match=r"must return a torch\.Tensor or a dict"):
        check_inputs([torch.zeros(2)])


def test_stdlib_task_is_real_text_in_eight_classes_with_a_fixed_split():
    samples, names = stdlib_docs()
    assert names == list(PACKAGES)
    assert {label for _, label in samples} == set(range(8))
    assert len(samples) > 1500
    train, val = split(samples)
    assert 0.15 < len(val) / len(samples) < 0.25
    assert split(samples) == (train, val)
    vocab = WordVocab([t for t, _ in train], size=500)
    ids, mask = vocab.encode(train[0][0], 128)
    assert ids[0] == 2 and int(mask.sum()) == int((ids != 0).sum())  # [CLS] ... [SEP], pads


def test_tsv_lines_without_a_tab_are_named(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("spam\tbuy now\n\nham\tsee you\nnot a row\n")
    with pytest.raises(DataError, match="line 4 is not 'label<TAB>text'"):
        read_tsv(path)


def test_text_classifier_through_the_whole_pipeline(tmp_path):
    kind = "bert"
    train, val, vocab = text_loaders()
    model = tiny_bert(vocab, kind)
    fit_baseline(model, train, epochs=10, lr=0.3, progress=False)
    pipeline = cz.Pipeline([
        cz.SparsityTraining(epochs=1, l1=1e-4),
        cz.StructuredPruning(ratio=0.5),
        cz.Distillation(epochs=2),
        cz.Int8Quantization(calibration_samples=64),
    ])  # fmt: skip
    settings = {"progress": False, "threads": 1, "throughput_batch": 8}
    result = pipeline.run(
        model, train, val, output_dir=tmp_path, runtimes=["onnxruntime"], **settings
    )
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["model_io"]["output"] == "logits"
    assert report["model_io"]["inputs"] == [
        {"name": "input_ids", "dtype": "int64", "shape": [16]},
        {"name": "attention_mask", "dtype": "int64", "shape": [16]},
    ]
    rows_ = {(r["name"], r["runtime"]): r for r in report["rows"]}
    base = rows_["baseline", "torch"]["accuracy"]
    assert base > 0.8  # the cue word is learnt: chance is 1/3
    # whole heads: every attention keeps heads x the original head width
    attention = [m for m in result.model.modules() if hasattr(m, "attention_head_size")]
    heads = rows_["structured_pruning", "torch"]["details"]["pruning"]["attention_heads"]
    assert heads["heads_after"] < heads["heads_before"] == 8
    for m in attention:
        q = m.query if kind == "bert" else m.q_lin
        count = m.num_attention_heads if kind == "bert" else m.n_heads
        assert m.attention_head_size == 8 and q.out_features == 8 * count
    final = rows_["int8_quantization", "onnxruntime"]
    assert final["accuracy"] > rows_["distillation", "torch"]["accuracy"] - 0.05
    choice = final["details"]["quantization"]["mode_choice"]
    assert choice["chosen"] in ("static", "dynamic")
    gap = choice["dynamic"]["top1_agreement"] - choice["static"]["top1_agreement"]
    if abs(gap) > 0.005:  # the file clearly closer to FP32 wins, whatever the timings say
        assert choice["chosen"] == ("dynamic" if gap > 0 else "static"), choice
    # both files take the two named int64 inputs with a dynamic sequence axis
    for path in (tmp_path / "model.onnx", result.onnx_path):
        graph = onnx.load(path).graph
        assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
        assert all(i.type.tensor_type.elem_type == onnx.TensorProto.INT64 for i in graph.input)
    # INT8 against FP32 on the eval data, and at a sequence length the export never saw
    int8 = onnx_predictor(result.onnx_path, 1)
    batch = next(iter(val))[0]
    compressed = torch_predictor(result.model)(batch)
    assert (int8(batch).argmax(1) == compressed.argmax(1)).float().mean() > 0.9
    fp32 = onnx_predictor(tmp_path / "model.onnx", 1)
    longer = {k: torch.cat([v, v[:, -1:].repeat(1, 8)], 1) for k, v in batch.items()}
    with torch.inference_mode():  # model.onnx is the baseline's export
        expected = model.eval()(**longer).logits
    assert torch.allclose(fp32(longer), expected, atol=1e-4)


def test_int8_modes_are_kept_apart(tmp_path):
    train, val, vocab = text_loaders()
    model = tiny_bert(vocab)
    for mode, op in (("static", "QuantizeLinear"), ("dynamic", "DynamicQuantizeLinear")):
        result = cz.Pipeline([cz.Int8Quantization(mode=mode, calibration_samples=32)]).run(
            model, train, val, output_dir=tmp_path / mode, progress=False, threads=1,
            runtimes=["onnxruntime"], throughput_batch=8,
        )  # fmt: skip
        ops = {n.op_type for n in onnx.load(result.onnx_path).graph.node}
        assert op in ops
        row = result.report.rows[-1].details["quantization"]
        assert row["format"] == ("QDQ" if mode == "static" else "dynamic")
        assert row["mode_choice"] is None
    with pytest.raises(cz.RecipeError, match="mode must be one of"):
        cz.Int8Quantization(mode="fast")


def test_distilbert_loses_whole_heads_and_keeps_its_outputs_shape(tmp_path):
    train, val, vocab = text_loaders()
    model = tiny_bert(vocab, "distilbert")
    result = cz.Pipeline([cz.StructuredPruning(ratio=0.5)]).run(
        model, train, val, output_dir=tmp_path, progress=False, threads=1,
        runtimes=["onnxruntime"], throughput_batch=8,
    )  # fmt: skip
    row = next(r for r in result.report.rows if r.name == "structured_pruning")
    assert row.details["pruning"]["attention_heads"]["heads_after"] < 8
    for m in result.model.modules():
        if hasattr(m, "n_heads"):
            assert m.q_lin.out_features == m.n_heads * m.attention_head_size == m.v_lin.out_features
    batch = next(iter(val))[0]
    assert result.model(**batch).shape == (32, 3)


def test_hf_vit_prunes_whole_heads_on_images(tmp_path):
    from compressor.sources.model_specs import load_model

    torch.manual_seed(0)
    model = load_model("hf:vit-tiny", num_classes=10, in_channels=1, input_size=28)
    data = [(torch.randn(8, 1, 28, 28), torch.randint(10, (8,))) for _ in range(4)]
    result = cz.Pipeline([cz.StructuredPruning(ratio=0.5)]).run(
        model, data, data, output_dir=tmp_path, progress=False, threads=1,
        runtimes=["onnxruntime"], throughput_batch=8,
    )  # fmt: skip
    row = next(r for r in result.report.rows if r.name == "structured_pruning")
    heads = row.details["pruning"]["attention_heads"]
    assert heads["heads_after"] < heads["heads_before"] == 16
    out = result.model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10)


def write_tsv(folder, samples):
    folder.mkdir()
    for name, rows_ in (("train.tsv", samples[:400]), ("val.tsv", samples[400:])):
        (folder / name).write_text("".join(f"{WORDS[y]}\t{t}\n" for t, y in rows_))


def test_cli_compresses_an_hf_config_on_tsv_text(tmp_path, capsys):
    write_tsv(tmp_path / "text", sentences(480, 0))
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    config.save_pretrained(tmp_path / "cfg")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "stages:\n  - structured_pruning: {ratio: 0.5}\n"
        "  - int8_quantization: {calibration_samples: 16}\n"
    )
    args = [
        "compress", "--model", f"hf:{tmp_path / 'cfg' / 'config.json'}",
        "--data", f"text:{tmp_path / 'text'}", "--seq-len", "24", "--baseline-epochs", "1",
        "--recipe", str(recipe), "--threads", "1", "--throughput-batch", "4",
        "--runtime", "onnxruntime", "--quiet", "--output", str(tmp_path / "run"),
    ]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert [i["shape"] for i in report["model_io"]["inputs"]] == [[24], [24]]
    assert "'input_ids': input_ids.astype(np.int64)" in (tmp_path / "run" / "report.md").read_text()
    # bench feeds both named inputs at the sequence length it is given
    bench = [
        "bench",
        str(tmp_path / "run" / "model.onnx"),
        str(tmp_path / "run" / "model.int8.onnx"),
    ]
    options = ["--input-shape", "24", "--batch-sizes", "1", "--threads", "1", "--json"]
    assert main([*bench, *options, "--runtime", "onnxruntime"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["precision"] for r in rows] == ["fp32", "int8"]


def pretrained_bert(folder, tokenizer=True):
    """A folder as ``from_pretrained`` reads it: a BERT's config and weights and, with
    ``tokenizer``, its WordPiece tokenizer (built offline). The tokenizer knows the cue
    words only (the noise words are [UNK]): 8 ids, fewer than a word vocabulary of the
    same text has (12), so the model's embedding holds the tokenizer's ids only."""
    folder.mkdir()
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS[:3]]))
    v5 = int(transformers.__version__.split(".")[0]) >= 5  # the file's argument was renamed
    tok = transformers.BertTokenizerFast(**{"vocab" if v5 else "vocab_file": str(vocab)})
    config = transformers.BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=3,
    )  # fmt: skip
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    if tokenizer:
        tok.save_pretrained(folder)
    else:
        vocab.unlink()
    return tok


def test_text_is_encoded_by_the_tokenizer_given(tmp_path):
    write_tsv(tmp_path / "text", sentences(480, 0))
    tok = pretrained_bert(tmp_path / "model")
    options = DataOptions(seq_len=10, tokenizer=str(tmp_path / "model"))
    train, _, info = load_data(f"text:{tmp_path / 'text'}", options)
    assert info.vocab_size == len(tok) == 8
    for index in (0, 7):
        inputs, _ = train.dataset[index]
        text = train.dataset.samples[index][0]
        want = tok(text, max_length=10, truncation=True, padding="max_length")
        assert inputs["input_ids"].tolist() == want["input_ids"]
        assert inputs["attention_mask"].tolist() == want["attention_mask"]
    assert inputs["input_ids"][0] == tok.cls_token_id and 1 in inputs["input_ids"].tolist()
    words = load_data(f"text:{tmp_path / 'text'}", DataOptions(seq_len=10))[2]
    assert words.vocab_size == 12  # a word vocabulary numbers the same text otherwise
    with pytest.raises(UserError, match="no such tokenizer folder"):
        load_data("text-demo", DataOptions(tokenizer=str(tmp_path / "nope")))
    with pytest.raises(UserError, match=r"--seq-len and --tokenizer are for text data"):
        load_data("demo", DataOptions(tokenizer=str(tmp_path / "model")))


def test_cli_encodes_text_with_a_pretrained_models_own_tokenizer(tmp_path, capsys):
    write_tsv(tmp_path / "text", sentences(480, 0))
    pretrained_bert(tmp_path / "model")
    pretrained_bert(tmp_path / "bare", tokenizer=False)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - int8_quantization: {calibration_samples: 16}\n")
    common = [
        "compress", "--data", f"text:{tmp_path / 'text'}", "--seq-len", "16",
        "--recipe", str(recipe), "--threads", "1", "--throughput-batch", "2",
        "--runtime", "onnxruntime", "--quiet",
    ]  # fmt: skip
    # a word vocabulary would need 12 ids: only the model's own tokenizer fits its embedding
    run = tmp_path / "run"
    assert main([*common, "--model", f"hf:{tmp_path / 'model'}", "--output", str(run)]) == 0
    assert json.loads((run / "report.json").read_text())["rows"]
    capsys.readouterr()
    bare = ["--model", f"hf:{tmp_path / 'bare'}", "--output", str(tmp_path / "o")]
    assert main([*common, *bare]) == 2
    err = capsys.readouterr().err
    assert "cannot load a tokenizer from" in err and "give --tokenizer" in err, err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "torchvision:resnet18", "--data", "text-demo"], "needs a text model"),
        (["--data", "demo", "--tokenizer", "bert-base-uncased"], "are for text data"),
        (
            ["--model", "hf:bert-tiny", "--data", "text-demo", "--channels", "3"],
            "text takes --seq-len",
        ),
        (
            ["--model", "hf:bert-tiny", "--data", "text-demo", "--seq-len", "1"],
            "--seq-len must be >= 2",
        ),
        (["--model", "hf:./no-such-folder", "--data", "text-demo"], "give a preset"),
        (["--model", "hf:bert-tiny", "--data", "text"], "needs a folder: --data text:DIR"),
    ],
)
def test_cli_refuses_bad_text_combinations_in_one_line(args, message, tmp_path, capsys):
    assert main(["compress", *args, "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
