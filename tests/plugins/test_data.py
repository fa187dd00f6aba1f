"""The built-in data sources: text, csv, jsonl — rows, cheap columns, limits and errors."""
from __future__ import annotations

import pytest

from squeezelang.errors import SqueezeError
from squeezelang_plugins.data import CsvSource, JsonlSource, TextSource


def write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


# -- text --------------------------------------------------------------------------------------

def test_text_skips_blank_lines_and_honours_limit(tmp_path):
    path = write(tmp_path, "t.txt", "one\n\n  \ntwo\r\nthree\n")
    assert TextSource().load({"path": path}) == [{"text": "one"}, {"text": "two"}, {"text": "three"}]
    assert TextSource().load({"path": path, "limit": 2}) == [{"text": "one"}, {"text": "two"}]
    assert TextSource().columns({"path": path}) == ["text"]


def test_text_reads_the_fixture(sentences_file):
    from conftest import SENTENCES

    assert [r["text"] for r in TextSource().load({"path": str(sentences_file)})] == SENTENCES


@pytest.mark.parametrize("source, args", [
    (TextSource(), {}), (CsvSource(), {"columns": ["a"]}), (JsonlSource(), {}),
])
def test_missing_file_names_it(tmp_path, source, args):
    path = str(tmp_path / "nope.txt")
    for call in (source.columns, source.load):
        with pytest.raises(SqueezeError, match="nope.txt"):
            call({"path": path, **args})


@pytest.mark.parametrize("source", [TextSource(), CsvSource(), JsonlSource()])
def test_invalid_utf8_names_the_file(tmp_path, source):
    path = write(tmp_path, "bad.txt", b"a,b\n\xff\xfe,\xfa\n")
    with pytest.raises(SqueezeError, match=r"bad\.txt.*UTF-8"):
        source.load({"path": path})


def test_directory_is_not_a_data_file(tmp_path):
    with pytest.raises(SqueezeError, match="directory"):
        TextSource().load({"path": str(tmp_path)})


# -- csv ---------------------------------------------------------------------------------------

def test_csv_with_columns_has_no_header_and_quotes_work(tmp_path):
    path = write(tmp_path, "q.csv", '"A man, walking.","He said ""hi""",4.5\nx,y,0\n')
    args = {"path": path, "columns": ["a", "b", "score"]}
    assert CsvSource().columns(args) == ["a", "b", "score"]
    assert CsvSource().load(args) == [{"a": "A man, walking.", "b": 'He said "hi"', "score": "4.5"},
                                      {"a": "x", "b": "y", "score": "0"}]


def test_csv_header_row_names_columns(tmp_path):
    path = write(tmp_path, "h.csv", "s1,s2,gold\nx,y,1\n\nz,w,2\n")
    assert CsvSource().columns({"path": path}) == ["s1", "s2", "gold"]
    assert CsvSource().load({"path": path}) == [{"s1": "x", "s2": "y", "gold": "1"},
                                                {"s1": "z", "s2": "w", "gold": "2"}]


def test_csv_header_true_with_columns_skips_and_renames(tmp_path):
    path = write(tmp_path, "h.csv", "s1,s2,gold\nx,y,1\nz,w,2\n")
    args = {"path": path, "columns": ["a", "b", "score"], "header": True, "limit": 1}
    assert CsvSource().columns(args) == ["a", "b", "score"]
    assert CsvSource().load(args) == [{"a": "x", "b": "y", "score": "1"}]


def test_csv_delimiter_and_limit(tmp_path):
    path = write(tmp_path, "t.tsv", "a\tb\n1\t2\n3\t4\n5\t6\n")
    assert CsvSource().load({"path": path, "delimiter": "\t", "limit": 2}) == [
        {"a": "1", "b": "2"}, {"a": "3", "b": "4"}]


def test_csv_wrong_field_count_names_file_and_line(tmp_path):
    path = write(tmp_path, "w.csv", "x,y,1\nx,y\n")
    with pytest.raises(SqueezeError, match=r"w\.csv:2: expected 3 fields .* found 2"):
        CsvSource().load({"path": path, "columns": ["a", "b", "score"]})


def test_csv_line_numbers_count_quoted_newlines(tmp_path):
    path = write(tmp_path, "m.csv", 'a,b\n"multi\nline",1\nonly\n')
    with pytest.raises(SqueezeError, match=r"m\.csv:4:"):
        CsvSource().load({"path": path})


def test_csv_header_false_without_columns_is_an_error(tmp_path):
    path = write(tmp_path, "n.csv", "x,y\n")
    with pytest.raises(SqueezeError, match="needs columns"):
        CsvSource().columns({"path": path, "header": False})


def test_csv_header_mismatch_with_columns(tmp_path):
    path = write(tmp_path, "h.csv", "s1,s2\nx,y\n")
    with pytest.raises(SqueezeError, match=r"h\.csv:1: the header row has 2 fields"):
        CsvSource().columns({"path": path, "columns": ["a", "b", "c"], "header": True})


def test_csv_empty_file(tmp_path):
    with pytest.raises(SqueezeError, match="empty"):
        CsvSource().columns({"path": write(tmp_path, "e.csv", "")})


def test_csv_columns_reads_only_the_first_line(tmp_path):
    # a broken second row does not matter to `columns`, which squeeze check calls
    path = write(tmp_path, "c.csv", "a,b\nonly-one\n")
    assert CsvSource().columns({"path": path}) == ["a", "b"]


# -- jsonl -------------------------------------------------------------------------------------

def test_jsonl_rows_fields_and_limit(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"text": "hi", "label": 1, "x": 0}\n\n{"text": "yo", "label": 0}\n')
    assert JsonlSource().columns({"path": path}) == ["text", "label", "x"]
    assert JsonlSource().load({"path": path, "fields": ["text", "label"]}) == [
        {"text": "hi", "label": 1}, {"text": "yo", "label": 0}]
    assert JsonlSource().load({"path": path, "limit": 1}) == [{"text": "hi", "label": 1, "x": 0}]
    assert JsonlSource().columns({"path": path, "fields": ["text"]}) == ["text"]


def test_jsonl_bad_json_names_file_and_line(tmp_path):
    path = write(tmp_path, "b.jsonl", '{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(SqueezeError, match=r"b\.jsonl:2: not valid JSON"):
        JsonlSource().load({"path": path})


def test_jsonl_non_object_and_missing_field(tmp_path):
    path = write(tmp_path, "n.jsonl", '[1, 2]\n')
    with pytest.raises(SqueezeError, match=r"n\.jsonl:1: expected a JSON object"):
        JsonlSource().load({"path": path})
    path = write(tmp_path, "m.jsonl", '{"text": "a"}\n{"label": 1}\n')
    with pytest.raises(SqueezeError, match=r"m\.jsonl:2: the object has no 'text'"):
        JsonlSource().load({"path": path, "fields": ["text"]})


def test_schemas_forbid_unknown_keys():
    import jsonschema

    for source in (TextSource(), CsvSource(), JsonlSource()):
        source.validate_definition()
        assert source.positional == ("path",)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"path": "x", "lmit": 3}, source.schema)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({}, source.schema)
