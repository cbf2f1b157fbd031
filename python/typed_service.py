#!/usr/bin/env python3
''' A typed record service written with the reference's own classes,
    cs.packetstream's `BaseRequest` and `HasPacketConnection` over
    cs.binary's `BinaryMultiValue` (release 20240630). The same service is
    written in Rust in examples/typed_service.rs, type for type and field
    for field; the two speak to each other over a packet stream.

    Modes (the stream is this process's stdin (receive) and stdout (send)):
      serve    serve the records service until the other end sends EOF,
               then shut down cleanly and exit 0
      client   run the checks against a records server on the other end,
               shut down cleanly, print `typed: N passed, M failed` on
               stderr, and exit 0 only if all passed

    The request types, as the application numbers them:
      0 STORE      a Record; keeps it, answers its index as a UInt32LE
      1 FETCH      an index (UInt32LE); answers the Record stored there,
                   or fails if there is none
      2 SUMMARISE  a Record; answers a Summary computed from its values
      3 ECHO       a Record; answers it, decoded and encoded again
      4 NAMES      nothing; answers the names of the stored Records, in order

    Everything human-readable goes to stderr: stdout is the packet stream.
    The process exits with status 3 after PEER_TIMEOUT seconds (default
    120), so that it never hangs a test run.
'''

import os
import signal
import sys

from cs.binary import (
    BinaryListValues,
    BinaryMultiValue,
    BinaryUTF8NUL,
    BSData,
    BSSFloat,
    BSString,
    BSUInt,
    Float64BE,
    Float64LE,
    Int16LE,
    Int32BE,
    Int32LE,
    pt_spec,
    UInt8,
    UInt16LE,
    UInt32BE,
    UInt32LE,
    UInt64BE,
    UInt64LE,
)
from cs.packetstream import BaseRequest, HasPacketConnection

STORE, FETCH, SUMMARISE, ECHO, NAMES = range(5)

def log(msg):
  print(f'typed_service.py: {msg}', file=sys.stderr, flush=True)

def counted_list(pt):
  ''' A list field for `BinaryMultiValue`: a `BSUInt` count, then that many
      items parsed by `BinaryListValues` with the parse/transcribe
      specification `pt`. The field's value is a list of plain values.
      cs.binary's lists carry no count of their own; this is the Rust
      crate's `Vec<T>`.
  '''
  item_class = pt_spec(pt)

  def parse_value(bfr):
    count = BSUInt.parse_value(bfr)
    items = BinaryListValues.parse(bfr, count=count, pt=item_class).values
    if len(items) != count:
      raise EOFError(f'list of {count} items ends after {len(items)}')
    return [item.value for item in items]

  def transcribe_value(values):
    yield BSUInt.transcribe_value(len(values))
    for value in values:
      yield item_class.transcribe_value(value)

  return parse_value, transcribe_value

# A record: one field of each kind, in the order the wire carries them.
Record = BinaryMultiValue(
    'Record',
    dict(
        id=UInt32BE,
        kind=UInt8,
        offset=Int16LE,
        delta=Int32BE,
        stamp=UInt64LE,
        temperature=Float64BE,
        ratio=BSSFloat,
        name=BSString,
        label=BinaryUTF8NUL,
        blob=BSData,
        count=BSUInt,
        samples=counted_list(Int32LE),
    ),
)

# What SUMMARISE computes from a record's values. Its encodings differ from
# the record's, so that a byte order mistaken the same way on both sides
# cannot cancel out.
Summary = BinaryMultiValue(
    'Summary',
    dict(
        id_next=UInt64BE,
        offset_negated=Int32LE,
        temperature_doubled=Float64LE,
        ratio_halved=BSSFloat,
        name_reversed=BSString,
        label_len=UInt16LE,
        blob_sum=UInt32BE,
        samples_sorted=counted_list(Int32BE),
    ),
)

FetchIndex = BinaryMultiValue('FetchIndex', dict(index=UInt32LE))
NoFields = BinaryMultiValue('NoFields', {})
NameList = BinaryMultiValue('NameList', dict(names=counted_list(BSString)))

def fields(rec):
  ''' The field values of a `Record` (or a request built on it), with the
      bytes as `bytes` (the parser may hand out a `memoryview`).
  '''
  values = {name: getattr(rec, name) for name in Record.FIELD_ORDER}
  values['blob'] = bytes(values['blob'])
  return values

def summarise(rec):
  ''' The `Summary` of a record. '''
  return Summary(
      id_next=rec.id + 1,
      offset_negated=-rec.offset,
      temperature_doubled=rec.temperature * 2,
      ratio_halved=rec.ratio / 2,
      name_reversed=rec.name[::-1],
      label_len=len(rec.label.encode('utf-8')),
      blob_sum=sum(bytes(rec.blob)),
      samples_sorted=sorted(rec.samples),
  )

class Store(BaseRequest, Record):
  ''' STORE: keep a record; the response is its index. '''

  def fulfil(self, context):
    return UInt32LE.transcribe_value(context.store(Record(**fields(self))))

  def decode_response_payload(self, flags, payload):
    return UInt32LE.from_bytes(payload).value

class Fetch(BaseRequest, FetchIndex):
  ''' FETCH: the record stored at an index. '''

  def fulfil(self, context):
    return bytes(context.records[self.index])

  def decode_response_payload(self, flags, payload):
    return Record.from_bytes(payload)

class Summarise(BaseRequest, Record):
  ''' SUMMARISE: the summary of a record. '''

  def fulfil(self, context):
    return bytes(summarise(self))

  def decode_response_payload(self, flags, payload):
    return Summary.from_bytes(payload)

class Echo(BaseRequest, Record):
  ''' ECHO: the record, decoded and encoded again. '''

  def fulfil(self, context):
    return bytes(Record(**fields(self)))

  def decode_response_payload(self, flags, payload):
    return Record.from_bytes(payload)

class Names(BaseRequest, NoFields):
  ''' NAMES: the names of the stored records, in order. '''

  def fulfil(self, context):
    return bytes(NameList(names=[rec.name for rec in context.records]))

  def decode_response_payload(self, flags, payload):
    return NameList.from_bytes(payload).names

RQ_TYPE_MAP = {
    STORE: Store,
    FETCH: Fetch,
    SUMMARISE: Summarise,
    ECHO: Echo,
    NAMES: Names,
}

class RecordService(HasPacketConnection):
  ''' Either end of the records service: the context requests are
      fulfilled against, and the connection they travel on.
  '''

  def __init__(self, recv_send, name):
    super().__init__(recv_send, name, rq_type_map=RQ_TYPE_MAP)
    self.records = []

  def store(self, rec):
    self.records.append(rec)
    return len(self.records) - 1

def records():
  ''' The records the client sends: every field at its edges. The same
      list as `records()` in examples/typed_service.rs.
  '''
  return [
      Record(
          id=0, kind=0, offset=0, delta=0, stamp=0, temperature=0.0,
          ratio=0.0, name='', label='', blob=b'', count=0, samples=[]
      ),
      Record(
          id=2**32 - 1, kind=255, offset=2**15 - 1, delta=2**31 - 1,
          stamp=2**64 - 1, temperature=1.7976931348623157e308, ratio=1e16,
          name='n' * 200, label='l' * 130, blob=bytes(range(256)),
          count=2**64 - 1, samples=[2**31 - 1] * 3
      ),
      Record(
          id=1, kind=1, offset=-2**15, delta=-2**31, stamp=1,
          temperature=float('-inf'), ratio=-0.0, name='min', label='-',
          blob=b'\0', count=127, samples=[-2**31, -1, 0, 1]
      ),
      Record(
          id=0x01020304, kind=0x7f, offset=0x0102, delta=0x01020304,
          stamp=0x0102030405060708, temperature=-273.15, ratio=0.1,
          name='żółw 🐢', label='ünïcödé', blob=b'\x01\x02\x03', count=128,
          samples=list(range(-64, 66))
      ),
      Record(
          id=7, kind=2, offset=-1, delta=-7, stamp=2**63,
          temperature=float('inf'), ratio=float('nan'), name='nan',
          label='nan', blob=b'nan', count=16384, samples=[7]
      ),
      Record(
          id=8, kind=3, offset=300, delta=70000, stamp=2**32,
          temperature=5e-324, ratio=1e-05, name='small', label='tiny',
          blob=bytes(1000), count=2**32, samples=[3, 1, 2]
      ),
      Record(
          id=9, kind=4, offset=-300, delta=-70000, stamp=2**40,
          temperature=1 / 3, ratio=123456.789, name='third', label='',
          blob=b'x' * 128, count=1, samples=[0] * 128
      ),
  ]

class Checks:

  def __init__(self):
    self.passed = 0
    self.failed = []

  def expect(self, what, got, want):
    if got == want:
      self.passed += 1
    else:
      self.failed.append(what)
      log(f'FAIL {what}: got {got!r:.300} want {want!r:.300}')

def run_checks(svc, checks):
  recs = records()
  for idx, rec in enumerate(recs):
    want = bytes(rec)
    got = svc.conn_do_remote(Echo(**fields(rec)))
    checks.expect(f'echo #{idx}', bytes(got), want)
    got = svc.conn_do_remote(Summarise(**fields(rec)))
    checks.expect(f'summarise #{idx}', bytes(got), bytes(summarise(rec)))
    got = svc.conn_do_remote(Store(**fields(rec)))
    checks.expect(f'store #{idx}', got, idx)
  for idx, rec in enumerate(recs):
    got = svc.conn_do_remote(Fetch(index=idx))
    checks.expect(f'fetch #{idx}', bytes(got), bytes(rec))
  checks.expect(
      'names', svc.conn_do_remote(Names()), [rec.name for rec in recs]
  )
  try:
    got = svc.conn_do_remote(Fetch(index=len(recs)))
  except ValueError as e:
    got = f'not ok: {e}'
  checks.expect('fetch past the end fails', got.startswith('not ok'), True)
  # a STORE whose record ends after its first byte must be refused
  ok, _, _ = svc.conn(STORE, b'\0')
  checks.expect('truncated store is refused', ok, False)

def stream_fds():
  ''' Return (recv_fd, send_fd) for the packet stream: stdin and stdout.
      The reference prints progress reports on sys.stdout, which would
      corrupt the stream, so fd 1 is moved aside and stdout goes to stderr.
  '''
  send_fd = os.dup(1)
  os.dup2(2, 1)
  sys.stdout = sys.stderr
  return 0, send_fd

def serve():
  svc = RecordService(stream_fds(), 'py-typed-serve')
  with svc.conn:
    svc.conn.join_recv()
  log(f'serve: clean shutdown, {len(svc.records)} records stored')
  return 0

def client():
  checks = Checks()
  svc = RecordService(stream_fds(), 'py-typed-client')
  with svc.conn:
    run_checks(svc, checks)
  log(f'client: {checks.passed} passed, {len(checks.failed)} failed')
  # a plain closing line for test runners
  print(
      f'typed: {checks.passed} passed, {len(checks.failed)} failed',
      file=sys.stderr,
      flush=True
  )
  return 0 if not checks.failed else 1

def main(argv):
  mode = argv[1] if len(argv) > 1 else ''
  signal.signal(signal.SIGALRM, lambda *_: os._exit(3))
  signal.alarm(int(os.environ.get('PEER_TIMEOUT', '120')))
  if mode == 'serve':
    return serve()
  if mode == 'client':
    return client()
  log('usage: typed_service.py serve|client')
  return 2

if __name__ == '__main__':
  sys.exit(main(sys.argv))
