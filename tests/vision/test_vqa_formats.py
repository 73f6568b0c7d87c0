"""Benchmark annotation loaders on tiny fixture files written here."""
import json

import pytest

from vision.vqa_formats import (
    METRIC_FOR_FORMAT,
    VQAFormatError,
    load_chartqa,
    load_docvqa,
    load_textvqa,
    load_vqa,
    load_vqav2,
    missing_images,
)


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def vqav2_files(tmp_path, drop=None):
    questions = {"data_subtype": "val2014", "questions": [
        {"image_id": 42, "question": "What color is the bus?", "question_id": 420},
        {"image_id": 7, "question": "How many dogs?", "question_id": 70},
    ]}
    annotations = {"annotations": [
        {"question_id": 420, "image_id": 42, "answer_type": "other", "question_type": "what color",
         "multiple_choice_answer": "red",
         "answers": [{"answer": "red", "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)]},
        {"question_id": 70, "image_id": 7, "answers": [{"answer": a, "answer_id": i + 1}
                                                        for i, a in enumerate(["2"] * 6 + ["two"] * 4)]},
    ]}
    if drop:
        del questions["questions"][1][drop]
    return write(tmp_path / "q.json", questions), write(tmp_path / "a.json", annotations)


def test_vqav2(tmp_path):
    q, a = vqav2_files(tmp_path)
    records = load_vqav2(q, a, image_dir=tmp_path / "val2014")
    assert [r.question_id for r in records] == [420, 70]
    assert records[0].image == tmp_path / "val2014" / "COCO_val2014_000000000042.jpg"
    assert records[0].answers == ["red"] * 10 and records[0].extra["answer_type"] == "other"
    assert records[1].answers == ["2"] * 6 + ["two"] * 4 and records[1].question == "How many dogs?"
    test_split = load_vqav2(q, image_pattern="{image_id:012d}.jpg")  # no annotations: test split
    assert test_split[1].answers == [] and test_split[1].image.name == "000000000007.jpg"
    assert len(missing_images(records)) == 2
    bad_q, _ = vqav2_files(tmp_path / "bad", drop="question")
    with pytest.raises(VQAFormatError, match=r"q.json: entry 1 \(question_id=70\): missing key 'question'"):
        load_vqav2(bad_q, a)
    only_one = write(tmp_path / "a1.json", {"annotations": json.loads(a.read_text())["annotations"][:1]})
    with pytest.raises(VQAFormatError, match=r"entry 1 \(question_id=70\): no annotation.*a1.json"):
        load_vqav2(q, only_one)


def test_textvqa(tmp_path):
    path = write(tmp_path / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": [
        {"question_id": 34602, "image_id": "003a8ae2ef43b901", "question": "what is the brand?",
         "answers": ["nokia"] * 8 + ["nokia phone"] * 2, "set_name": "val"},
    ]})
    (record,) = load_textvqa(path, image_dir=tmp_path / "train_images")
    assert record.image == tmp_path / "train_images" / "003a8ae2ef43b901.jpg" and len(record.answers) == 10
    write(path, {"data": [{"question_id": 1, "image_id": "x", "question": "q", "answers": "nokia"}]})
    with pytest.raises(VQAFormatError, match=r"entry 0 \(question_id=1\): 'answers' must be list"):
        load_textvqa(path)


def test_docvqa(tmp_path):
    path = write(tmp_path / "val" / "val_v1.0.json", {"dataset_name": "docvqa", "data": [
        {"questionId": 49153, "question": "What is the ratio?", "image": "documents/pybv0228_81.png",
         "docId": 14465, "answers": ["0.28", "0.28 ratio"], "question_types": ["figure/diagram"]},
        {"questionId": 49154, "question": "Test split?", "image": "documents/x.png"},
    ]})
    first, second = load_docvqa(path)
    assert first.image == tmp_path / "val" / "documents" / "pybv0228_81.png" and first.answers == ["0.28", "0.28 ratio"]
    assert second.answers == [] and first.extra["docId"] == 14465
    write(path, {"data": [{"questionId": 5, "question": "q"}]})
    with pytest.raises(VQAFormatError, match=r"val_v1.0.json: entry 0 \(questionId=5\): missing key 'image'"):
        load_docvqa(path)
    write(path, {"questions": []})
    with pytest.raises(VQAFormatError, match="val_v1.0.json: expected a JSON object with key 'data'"):
        load_docvqa(path)


def test_chartqa(tmp_path):
    path = write(tmp_path / "test" / "test_human.json", [
        {"imgname": "41699051005347.png", "query": "What is the peak value?", "label": "57"},
        {"imgname": "multi_col_1.png", "query": "Which year?", "label": 2019},
    ])
    records = load_vqa("chartqa", path)
    assert [r.question_id for r in records] == ["test_human/0", "test_human/1"]
    assert records[0].image == tmp_path / "test" / "png" / "41699051005347.png" and records[1].answers == ["2019"]
    assert METRIC_FOR_FORMAT["chartqa"] == "relaxed" and METRIC_FOR_FORMAT["docvqa"] == "anls"
    write(path, [{"imgname": "a.png", "label": "1"}])
    with pytest.raises(VQAFormatError, match=r"test_human.json: entry 0 \(imgname='a.png'\): missing key 'query'"):
        load_chartqa(path)
    write(path, {"data": []})
    with pytest.raises(VQAFormatError, match="expected a JSON list"):
        load_chartqa(path)
    path.write_text("{not json")
    with pytest.raises(VQAFormatError, match="test_human.json: not valid JSON"):
        load_chartqa(path)
    with pytest.raises(VQAFormatError, match="nothing.json: file not found"):
        load_chartqa(tmp_path / "nothing.json")
    with pytest.raises(ValueError, match="unknown VQA format 'gqa'"):
        load_vqa("gqa", path)
