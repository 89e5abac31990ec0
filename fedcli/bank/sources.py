"""Where a bank's table comes from, read as a stream of Arrow record batches.

A table is a CSV file, a Parquet file, a folder of (hive-)partitioned Parquet files, or any of
these at an `s3://bucket/key-or-prefix` URL (the same AWS environment as the store). It is never
loaded whole: `batches` yields record batches of a fixed number of rows, so what a reader holds
is one batch plus what it keeps from it. Batch boundaries depend only on the rows, never on the
file layout, so anything computed batch by batch is the same for every format.

CSV cells are read as text and typed later by the code that knows what a column means (a number,
a category, a label): Arrow's own type inference looks at the first block only, and a numeric
column with `n/a` a million rows down would otherwise fail half-way. Missing cells are the ones
pandas calls missing (empty, NA, NULL, nan, ...), so tables read as they always have.

Every problem with an input ends in one InputError line that names the table.
"""

from __future__ import annotations

import codecs
import os
from abc import ABC, abstractmethod
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fedcli.errors import InputError

ROWS_PER_BATCH = 65_536
BLOCK_BYTES = 4 << 20  # a CSV line (the header too) longer than this is refused
MAX_COLUMNS = 10_000
PARQUET_SUFFIXES = (".parquet", ".pq")
# What pandas reads as a missing cell (pandas.io.parsers' STR_NA_VALUES), so a CSV means what it always meant.
MISSING = [
    "",
    "#N/A",
    "#N/A N/A",
    "#NA",
    "-1.#IND",
    "-1.#QNAN",
    "-NaN",
    "-nan",
    "1.#IND",
    "1.#QNAN",
    "<NA>",
    "N/A",
    "NA",
    "NULL",
    "NaN",
    "None",
    "n/a",
    "nan",
    "null",
]
REFUSED = {
    ".xlsx": "Excel files are not read: export the sheet as CSV (UTF-8)",
    ".xlsm": "Excel files are not read: export the sheet as CSV (UTF-8)",
    ".xls": "Excel files are not read: export the sheet as CSV (UTF-8)",
    ".ods": "spreadsheet files are not read: export the sheet as CSV (UTF-8)",
    ".json": "JSON tables are not read: export the table as CSV or Parquet",
    ".jsonl": "JSON tables are not read: export the table as CSV or Parquet",
}
_ZIP, _OLE, _PAR1 = b"PK\x03\x04", b"\xd0\xcf\x11\xe0", b"PAR1"  # .xlsx/.ods are zip archives, .xls an OLE file
SEPARATORS = (",", ";", "\t", "|")  # in order of preference when the header has as many of each


@dataclass(frozen=True)
class Place:
    """A file or folder on a filesystem (local or S3), and how messages name it."""

    fs: pafs.FileSystem
    path: str  # as the filesystem spells it
    shown: str  # as the user gave it

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name or self.shown

    def child(self, path: str) -> Place:
        return Place(self.fs, path, path[len(self.path) :].lstrip("/") or self.name)


@dataclass(frozen=True)
class Part:
    """One readable piece of a table: a Parquet row group (file, its partition values, index), or the whole table."""

    path: str | None = None
    keys: tuple[tuple[str, object], ...] = ()
    row_group: int = 0


class TableSource(ABC):
    """A table read batch by batch: its columns, its row count when known, and its batches."""

    def __init__(self, place: Place, columns: list[str], rows: int | None, separator: str | None):
        self.place = place
        self.columns = columns
        self.rows = rows  # from metadata (Parquet); None for CSV, which must be read to be counted
        self.separator = separator  # CSV only

    @property
    def name(self) -> str:
        """The file or folder name, for messages."""
        return self.place.name

    def batches(
        self, columns: Sequence[str] | None = None, rows_per_batch: int = ROWS_PER_BATCH
    ) -> Iterator[pa.RecordBatch]:
        """Record batches of exactly `rows_per_batch` rows (the last may be shorter), of `columns` (default all)."""
        wanted = list(self.columns if columns is None else columns)
        unknown = [c for c in wanted if c not in self.columns]
        if unknown:
            raise InputError(f"{self.place.shown} has no column {unknown[0]!r}")
        try:
            yield from _rebatch(self._read(wanted, rows_per_batch), rows_per_batch)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise self._refusal(e) from None

    def parts(self) -> list[Part]:
        """Pieces of the table that can be read on their own, for shuffling their order: the whole table by
        default (a CSV file cannot seek); every row group for Parquet."""
        return [Part()]

    def part_batches(self, part: Part, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
        """The record batches of one part (sizes as the file gives them)."""
        if part.path is None:
            yield from self.batches(columns)
            return
        try:
            yield from self._read_part(part, list(columns))
        except (pa.ArrowException, OSError, ValueError) as e:
            raise self._refusal(e) from None

    def _read_part(self, part: Part, columns: list[str]) -> Iterator[pa.RecordBatch]:
        raise NotImplementedError

    @abstractmethod
    def _read(self, columns: list[str], rows_per_batch: int) -> Iterator[pa.RecordBatch]: ...

    def _refusal(self, e: BaseException) -> InputError:
        return InputError(f"cannot read {self.place.shown}: {_first_line(e)}")


def open_table(location: str | Path) -> TableSource:
    """Open a CSV or Parquet file, a folder of Parquet files, or an s3:// URL of either; refuse anything else."""
    place = _place(location)
    suffix = PurePosixPath(place.path).suffix.lower()
    if suffix in REFUSED:
        raise InputError(f"{place.name}: {REFUSED[suffix]}")
    info = _info(place)
    if info.type == pafs.FileType.Directory:
        return ParquetSource.folder(place)
    if info.type != pafs.FileType.File:
        if place.shown.startswith("s3://"):
            bucket = place.path.split("/")[0]
            if _info(Place(place.fs, bucket, place.shown)).type == pafs.FileType.NotFound:
                raise InputError(f"cannot read {place.shown}: bucket {bucket!r} does not exist")
            raise InputError(f"nothing at {place.shown}: no such object or prefix in the bucket")
        what = "does not exist" if info.type == pafs.FileType.NotFound else "is not a file"
        raise InputError(f"data file {place.shown} {what}")
    head = _head(place)
    if suffix in PARQUET_SUFFIXES or head.startswith(_PAR1):
        return ParquetSource.file(place)
    if head.startswith((_ZIP, _OLE)):
        raise InputError(f"{place.name} is a spreadsheet or archive, not CSV text. {REFUSED['.xlsx']}")
    return CsvSource.open(place, head, tab=suffix == ".tsv")


# --------------------------------------------------------------------------- where: local or S3


def _place(location: str | Path) -> Place:
    text = str(location)
    if text.startswith("s3:/"):  # a pathlib.Path turns s3://b/k into s3:/b/k
        url = "s3://" + text[len("s3:/") :].lstrip("/")
        bucket_and_key = url[len("s3://") :].rstrip("/")
        if not bucket_and_key.split("/")[0]:
            raise InputError(f"{url}: an S3 URL names a bucket, then a key or prefix: s3://bucket/path/to/table")
        return Place(s3_filesystem(url), bucket_and_key, url)
    return Place(pafs.LocalFileSystem(), os.path.abspath(text), text)


def s3_filesystem(url: str) -> pafs.S3FileSystem:
    """Arrow's S3 client from the same AWS environment as the store (fedcli/store/s3.py): the credentials boto3
    finds (variables, AWS_PROFILE, an instance or container role), AWS_ENDPOINT_URL(_S3), the session's region."""
    import boto3
    import botocore.exceptions

    try:
        session = boto3.session.Session()
        credentials = session.get_credentials()
        frozen = credentials.get_frozen_credentials() if credentials is not None else None
    except botocore.exceptions.BotoCoreError as e:
        raise InputError(f"no usable S3 credentials for {url}: {_first_line(e)}") from None
    if frozen is None or not (frozen.access_key and frozen.secret_key):
        raise InputError(
            f"no S3 credentials for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
        )
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    scheme, _, host = endpoint.rpartition("://")
    options: dict = {
        "access_key": frozen.access_key,
        "secret_key": frozen.secret_key,
        "session_token": frozen.token,
        "region": session.region_name or "us-east-1",
        "connect_timeout": 10,
        "request_timeout": 60,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
    }
    if host:
        options |= {"endpoint_override": host.rstrip("/"), "scheme": scheme or "https"}
    try:
        return pafs.S3FileSystem(**options)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise InputError(f"cannot open {url}: {_first_line(e)}") from None


def _info(place: Place) -> pafs.FileInfo:
    try:
        return place.fs.get_file_info(place.path)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise InputError(f"cannot read {place.shown}: {_s3_reason(e)}") from None


def _s3_reason(e: BaseException) -> str:
    """Arrow's S3 errors are long: say what a bank can act on."""
    text = _first_line(e)
    if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return "the bucket does not exist"
    if "ACCESS_DENIED" in text or "AccessDenied" in text or "InvalidAccessKeyId" in text or "403" in text:
        return "access denied: check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and the bucket policy"
    return text


def _head(place: Place) -> bytes:
    """The first block of a file: enough to tell formats apart and to find the header line."""
    try:
        with place.fs.open_input_file(place.path) as f:
            return f.read(BLOCK_BYTES)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise InputError(f"cannot read {place.shown}: {_s3_reason(e)}") from None


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split("\n")[0].split())
    return (text[:300] + "...") if len(text) > 300 else (text or type(e).__name__)


def _rebatch(batches: Iterable[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """Batches of exactly `rows` rows (the last may be shorter), whatever sizes the reader produced."""
    pending: list[pa.RecordBatch] = []
    held = 0
    for batch in batches:
        if not pending and batch.num_rows == rows:
            yield batch
            continue
        pending.append(batch)
        held += batch.num_rows
        if held < rows:
            continue
        table, start = pa.Table.from_batches(pending), 0
        while held - start >= rows:
            yield table.slice(start, rows).combine_chunks().to_batches()[0]
            start += rows
        pending, held = table.slice(start).to_batches(), held - start  # slices: no copy
    if held:
        yield pa.Table.from_batches(pending).combine_chunks().to_batches()[0]


# --------------------------------------------------------------------------- CSV


class CsvSource(TableSource):
    """A CSV file read as text cells, block by block; the separator is detected from the header line."""

    def __init__(self, place: Place, columns: list[str], separator: str, encoding: str, header: list[str]):
        super().__init__(place, columns, None, separator)
        self.encoding = encoding
        self.header = header  # the names as written; `columns` has repeated names numbered as pandas does

    @classmethod
    def open(cls, place: Place, head: bytes, tab: bool = False) -> CsvSource:
        if not head:
            raise InputError(f"cannot read {place.shown}: it is empty (not even a header line)")
        encoding = "utf-16" if head.startswith((b"\xff\xfe", b"\xfe\xff")) else "utf8"
        text = _decoded(place, head, encoding)
        line = text.split("\n", 1)[0].split("\r", 1)[0]
        if len(line) == len(text) and len(head) >= BLOCK_BYTES:
            raise InputError(
                f"cannot read {place.shown}: its first line is longer than {BLOCK_BYTES >> 20} MiB; "
                "is it a table with a header line?"
            )
        separator = "\t" if tab else detect_separator(line)
        source = cls(place, [], separator, encoding, [])
        header = source._header()
        if len(header) > MAX_COLUMNS:
            raise InputError(
                f"cannot read {place.shown}: its header has {len(header):,} columns (at most {MAX_COLUMNS:,})"
            )
        source.header, source.columns = header, numbered(header)
        return source

    def _options(
        self, types: dict[str, pa.DataType] | None, include: list[str] | None, errors: list, threads: bool = True
    ) -> tuple:
        def invalid(row) -> str:
            errors.append(row)
            return "error"

        read = pcsv.ReadOptions(block_size=BLOCK_BYTES, encoding=self.encoding, use_threads=threads)
        parse = pcsv.ParseOptions(delimiter=self.separator, newlines_in_values=True, invalid_row_handler=invalid)
        convert = pcsv.ConvertOptions(
            column_types=types,
            include_columns=include,
            null_values=MISSING,
            strings_can_be_null=True,
            quoted_strings_can_be_null=True,
        )
        return read, parse, convert

    def _stream(self, types=None, include=None, header_only: bool = False) -> Generator[pa.RecordBatch, None, None]:
        errors: list = []
        try:
            with self.place.fs.open_input_stream(self.place.path) as f:
                reader = pcsv.open_csv(f, *self._options(types, include, errors))
                if header_only:
                    yield pa.RecordBatch.from_pylist([], schema=reader.schema)
                    return
                yield from reader
        except (pa.ArrowException, OSError, ValueError, UnicodeError) as e:
            raise self._csv_refusal(e, errors) from None

    def _header(self) -> list[str]:
        """The column names as Arrow parses them (it reads the first block to open the file)."""
        stream = self._stream(types={}, header_only=True)
        try:
            return list(next(stream).schema.names)
        finally:
            stream.close()

    def _read(self, columns: list[str], rows_per_batch: int) -> Iterator[pa.RecordBatch]:
        positions = [self.columns.index(c) for c in columns]
        names = [self.header[i] for i in positions]
        types = {name: pa.string() for name in self.header}
        unique = len(set(self.header)) == len(self.header)
        for batch in self._stream(types, names if unique and columns else None):
            arrays = (
                [batch.column(i) for i in range(batch.num_columns)] if unique else [batch.column(i) for i in positions]
            )
            yield pa.RecordBatch.from_arrays(arrays, names=columns) if columns else batch.select([])

    def _first_invalid_row(self):
        """Parse again on one thread, the only way Arrow numbers rows, to say which row is ragged."""
        errors: list = []
        try:
            with self.place.fs.open_input_stream(self.place.path) as f:
                for _ in pcsv.open_csv(f, *self._options({}, None, errors, threads=False)):
                    pass
        except (pa.ArrowException, OSError, ValueError, UnicodeError):
            pass
        return errors[0] if errors else None

    def _csv_refusal(self, e: BaseException, invalid_rows: list) -> InputError:
        shown = self.place.shown
        if invalid_rows:
            row = invalid_rows[0] if invalid_rows[0].number else self._first_invalid_row() or invalid_rows[0]
            where = f"data row {row.number - 1}" if row.number and row.number > 1 else "a row"
            text = row.text if len(row.text) <= 60 else row.text[:57] + "..."
            return InputError(
                f"cannot read {shown}: {where} has {row.actual_columns} field(s) where the header has "
                f"{row.expected_columns} ({text!r}); is a separator or quote missing or extra?"
            )
        message = _first_line(e)
        if isinstance(e, UnicodeError) or "invalid UTF8" in message or "UTF-8" in message:
            return _not_utf8(self.place, self.encoding) or InputError(f"cannot read {shown}: {message}")
        if "Empty CSV file" in message:
            return InputError(f"cannot read {shown}: it is empty (not even a header line)")
        if "straddl" in message or "cannot infer number of columns" in message:
            return InputError(
                f"cannot read {shown}: a line (or a quoted cell) is longer than {BLOCK_BYTES >> 20} MiB; "
                "is a closing quote missing?"
            )
        return InputError(f"cannot read {shown}: {message}")


def detect_separator(header: str) -> str:
    """The separator the header line uses most, outside quotes: ',', ';', tab or '|' (',' when none)."""
    counts = dict.fromkeys(SEPARATORS, 0)
    quoted = False
    for ch in header:
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch in counts:
            counts[ch] += 1
    best = max(SEPARATORS, key=lambda s: counts[s])  # max keeps the first of equals: the order of preference
    return best if counts[best] else ","


def numbered(names: list[str]) -> list[str]:
    """Repeated column names numbered as pandas does (x, x.1, x.2), so every column can be asked for by name."""
    out: list[str] = []
    taken = set(names)
    seen: dict[str, int] = {}
    for name in names:
        if name not in seen:
            seen[name] = 0
            out.append(name)
            continue
        n = seen[name]
        while True:
            n += 1
            candidate = f"{name}.{n}"
            if candidate not in taken:
                break
        seen[name] = n
        taken.add(candidate)
        out.append(candidate)
    return out


def _decoded(place: Place, head: bytes, encoding: str) -> str:
    """The first block as text; bytes that are not the encoding are refused with their offset."""
    decoder = codecs.getincrementaldecoder("utf-8-sig" if encoding == "utf8" else encoding)()
    try:
        return decoder.decode(head, final=len(head) < BLOCK_BYTES)
    except UnicodeDecodeError as e:
        raise _utf8_refusal(place, e.object[e.start], e.start) from None


def _not_utf8(place: Place, encoding: str) -> InputError | None:
    """Find the first byte that is not UTF-8 (Arrow says only that there is one): its value and file offset."""
    if encoding != "utf8":
        return None
    offset, carry = 0, b""  # offset: where `carry + block` starts in the file
    with place.fs.open_input_stream(place.path) as f:
        while True:
            block = f.read(1 << 20)
            data = carry + block
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as e:
                if block and e.end == len(data) and e.reason == "unexpected end of data":
                    carry, offset = data[e.start :], offset + e.start  # a character cut by the block's end
                    continue
                return _utf8_refusal(place, data[e.start], offset + e.start)
            if not block:
                return None
            carry, offset = b"", offset + len(data)


def _utf8_refusal(place: Place, byte: int, offset: int) -> InputError:
    return InputError(
        f"cannot read {place.shown}: it is not UTF-8 text (byte 0x{byte:02x} at offset {offset}); save it as 'CSV UTF-8'"
    )


# --------------------------------------------------------------------------- Parquet


class ParquetSource(TableSource):
    """A Parquet file, or a folder of Parquet files (hive partitions like year=2024/ become columns)."""

    def __init__(self, place: Place, dataset: ds.Dataset):
        try:
            rows = dataset.count_rows()  # from the files' metadata: nothing is read
        except (pa.ArrowException, OSError, ValueError) as e:
            raise InputError(
                f"cannot read {place.shown}: it is not a readable Parquet table ({_first_line(e)})"
            ) from None
        super().__init__(place, list(dataset.schema.names), rows, None)
        self.dataset = dataset
        self.footers: dict[str, pq.FileMetaData] = {}
        partitioning = getattr(dataset, "partitioning", None)
        self.partitions = set(partitioning.schema.names) if partitioning is not None else set()

    @classmethod
    def file(cls, place: Place) -> ParquetSource:
        try:
            dataset = ds.dataset(place.path, filesystem=place.fs, format="parquet")
        except (pa.ArrowException, OSError, ValueError) as e:
            raise InputError(
                f"cannot read {place.shown}: it is not a readable Parquet file ({_parquet_reason(e)})"
            ) from None
        return cls(place, dataset)

    @classmethod
    def folder(cls, place: Place) -> ParquetSource:
        files = _parquet_files(place)
        try:
            dataset = ds.dataset(
                files,
                filesystem=place.fs,
                format="parquet",
                partitioning=ds.HivePartitioning.discover(infer_dictionary=False),
                partition_base_dir=place.path,
            )
        except (pa.ArrowException, OSError, ValueError) as e:
            raise InputError(f"cannot read {place.shown}: {_parquet_reason(e)}") from None
        _same_schema(place, dataset)
        return cls(place, dataset)

    def _read(self, columns: list[str], rows_per_batch: int) -> Iterator[pa.RecordBatch]:
        """File by file, row group by row group. (A dataset scanner reads ahead without bound when its
        consumer is slower than the disk; a file reader holds one row group.)"""
        for fragment in self.dataset.get_fragments():
            keys = ds.get_partition_keys(fragment.partition_expression)
            stored = [c for c in columns if c not in self.partitions] or self.columns[:1]
            with self.place.fs.open_input_file(fragment.path) as f:
                reader = pq.ParquetFile(f, pre_buffer=False)
                for batch in reader.iter_batches(batch_size=rows_per_batch, columns=stored, use_threads=True):
                    yield self._with_partitions(batch, columns, keys)

    def parts(self) -> list[Part]:
        """Every row group of every file, from the footers (nothing else is read)."""
        try:
            return list(self._row_groups())
        except (pa.ArrowException, OSError, ValueError) as e:
            raise self._refusal(e) from None

    def _row_groups(self) -> Iterator[Part]:
        for fragment in self.dataset.get_fragments():
            keys = tuple(ds.get_partition_keys(fragment.partition_expression).items())
            with self.place.fs.open_input_file(fragment.path) as f:
                footer = pq.ParquetFile(f, pre_buffer=False).metadata
            self.footers[fragment.path] = footer  # parsed once: a part is read many times
            yield from (Part(fragment.path, keys, i) for i in range(footer.num_row_groups))

    def _read_part(self, part: Part, columns: list[str]) -> Iterator[pa.RecordBatch]:
        assert part.path is not None
        stored = [c for c in columns if c not in self.partitions] or self.columns[:1]
        with self.place.fs.open_input_file(part.path) as f:
            reader = pq.ParquetFile(f, metadata=self.footers.get(part.path), pre_buffer=False)
            batches = reader.iter_batches(
                batch_size=ROWS_PER_BATCH, row_groups=[part.row_group], columns=stored, use_threads=True
            )
            for batch in batches:
                yield self._with_partitions(batch, columns, dict(part.keys))

    def _with_partitions(self, batch: pa.RecordBatch, columns: list[str], keys: dict) -> pa.RecordBatch:
        """The batch's columns in the order asked for, the folder's partition values as constant columns."""
        arrays = []
        for name in columns:
            if name in self.partitions:
                kind = self.dataset.schema.field(name).type
                arrays.append(pa.repeat(pa.scalar(keys.get(name), type=kind), batch.num_rows))
            else:
                arrays.append(batch.column(name))
        return pa.RecordBatch.from_arrays(arrays, names=columns)

    def _refusal(self, e: BaseException) -> InputError:
        return InputError(f"cannot read {self.place.shown}: it is not a readable Parquet table ({_parquet_reason(e)})")


def _parquet_files(place: Place) -> list[str]:
    """The Parquet files under a folder, in name order; names starting with '.' or '_' are skipped (Spark, Hive)."""
    try:
        infos = place.fs.get_file_info(pafs.FileSelector(place.path, recursive=True))
    except (pa.ArrowException, OSError, ValueError) as e:
        raise InputError(f"cannot read {place.shown}: {_s3_reason(e)}") from None
    files: list[str] = []
    others: list[str] = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        relative = PurePosixPath(info.path[len(place.path) :].lstrip("/"))
        if any(part.startswith((".", "_")) for part in relative.parts):
            continue
        (files if relative.suffix.lower() in PARQUET_SUFFIXES else others).append(info.path)
    if files and not others:
        return _once(place, sorted(files))
    if not others:
        raise InputError(f"cannot read {place.shown}: the folder is empty (no Parquet files)")
    example = place.child(sorted(others)[0]).shown
    if files:
        raise InputError(
            f"cannot read {place.shown}: a table folder holds only Parquet files (*.parquet, *.pq), and this one "
            f"also holds {example!r}; move other files out, or give one file by its own path"
        )
    raise InputError(
        f"cannot read {place.shown}: the folder has no Parquet files (*.parquet, *.pq), only e.g. {example!r}; "
        "give a CSV file by its own path"
    )


def _once(place: Place, files: list[str]) -> list[str]:
    """Refuse a folder that reaches one file twice (a link inside it): its rows would count twice."""
    if not isinstance(place.fs, pafs.LocalFileSystem):
        return files  # object stores have no links
    seen: dict[str, str] = {}
    for path in files:
        real = os.path.realpath(path)
        if real in seen:
            first, again = place.child(seen[real]).shown, place.child(path).shown
            raise InputError(
                f"cannot read {place.shown}: {first} and {again} are the same file (a link inside the folder); "
                "a table folder must reach each file once"
            )
        seen[real] = path
    return files


def _same_schema(place: Place, dataset: ds.Dataset) -> None:
    """Every file of a folder must have the first one's columns and types, or rows would silently mix meanings."""
    first = None
    for fragment in dataset.get_fragments():
        try:
            schema = fragment.physical_schema
        except (pa.ArrowException, OSError, ValueError) as e:
            name = place.child(fragment.path).shown
            raise InputError(
                f"cannot read {place.shown}: {name} is not a readable Parquet file ({_parquet_reason(e)})"
            ) from None
        columns = [(f.name, str(f.type)) for f in schema]
        if first is None:
            first = (place.child(fragment.path).shown, columns)
            continue
        if columns != first[1]:
            raise InputError(
                f"cannot read {place.shown}: its files have different columns: {first[0]} has "
                f"{_describe(first[1], columns)} but {place.child(fragment.path).shown} has {_describe(columns, first[1])}"
            )


def _describe(columns: list[tuple[str, str]], other: list[tuple[str, str]]) -> str:
    """The columns of one schema that the other lacks or types differently, short."""
    differ = [f"{name} ({kind})" for name, kind in columns if (name, kind) not in other]
    shown = ", ".join(differ[:3]) + (f" and {len(differ) - 3} more" if len(differ) > 3 else "")
    return shown or "fewer columns"


def _parquet_reason(e: BaseException) -> str:
    text = _first_line(e)
    if "magic bytes" in text or "Could not open Parquet input source" in text:
        return "no Parquet footer: the file is truncated or not Parquet"
    return _s3_reason(e)
