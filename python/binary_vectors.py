#!/usr/bin/env python3
''' Prints golden vectors for the payload codec as JSON: values of each
    cs.binary type (release 20240630) and the bytes cs.binary encodes them
    into. tests/binary_codec.rs checks the Rust types against them.

    Run it with the python of the venv that setup-venv.sh makes:

        python/setup-venv.sh
        target/python-venv/bin/python python/binary_vectors.py \
            > tests/data/binary_vectors.json

    The output is deterministic (a fixed random seed), so a rerun changes
    the file only if cs.binary's encodings change.

    Value notation in the JSON: integers as numbers; floats as the hex of
    their big-endian IEEE 754 bits (JSON has no inf or nan); bytes as hex;
    strings as strings; lists as arrays of those.
'''

import json
import random
import struct
import sys

from cs.binary import (
    BinaryUTF8NUL,
    BSData,
    BSSFloat,
    BSString,
    BSUInt,
    Float64BE,
    Float64LE,
    Int16BE,
    Int16LE,
    Int32BE,
    Int32LE,
    UInt8,
    UInt16BE,
    UInt16LE,
    UInt32BE,
    UInt32LE,
    UInt64BE,
    UInt64LE,
)

from typed_service import counted_list, Record

FIXED_INTS = {
    UInt8: (0, 2**8 - 1),
    UInt16BE: (0, 2**16 - 1),
    UInt16LE: (0, 2**16 - 1),
    UInt32BE: (0, 2**32 - 1),
    UInt32LE: (0, 2**32 - 1),
    UInt64BE: (0, 2**64 - 1),
    UInt64LE: (0, 2**64 - 1),
    Int16BE: (-2**15, 2**15 - 1),
    Int16LE: (-2**15, 2**15 - 1),
    Int32BE: (-2**31, 2**31 - 1),
    Int32LE: (-2**31, 2**31 - 1),
}

def float_bits(f):
  return struct.pack('>d', f).hex()

def int_values(lo, hi, rnd):
  values = {lo, hi, lo + 1, hi - 1, 0, 1, (lo + hi) // 2}
  if lo < 0:
    values |= {-1, -2}
  bits = hi.bit_length()
  for shift in range(0, bits + 1, 7):
    for v in (1 << shift, (1 << shift) - 1):
      if lo <= v <= hi:
        values.add(v)
  values |= {rnd.randint(lo, hi) for _ in range(8)}
  return sorted(values)

def float_values(rnd):
  values = [
      0.0, -0.0, 0.1, -0.1, 0.5, 1.0, -1.0, 100.0, 123456.789, 1e-4, 1e-5,
      0.000123, 1234567890123456.0, 1e15, 1e16, 1.5e16, 1e22, 2.5e-7,
      5e-324, 2.2250738585072014e-308, 1.7976931348623157e308,
      float('inf'), float('-inf'), float('nan'), 1 / 3, 2 / 3, 9007199254740993.0
  ]
  # spread over the exponents where the notation changes
  for exp in range(-8, 19):
    values.append(rnd.random() * 10.0**exp)
    values.append(-rnd.random() * 10.0**exp)
  # arbitrary finite bit patterns
  while len(values) < 150:
    f, = struct.unpack('>d', rnd.getrandbits(64).to_bytes(8, 'big'))
    if f == f and f not in (float('inf'), float('-inf')):
      values.append(f)
  return values

def main():
  rnd = random.Random(20240630)
  out = []

  def add(name, value, wire):
    out.append(dict(type=name, value=value, wire=bytes(wire).hex()))

  for cls, (lo, hi) in FIXED_INTS.items():
    for v in int_values(lo, hi, rnd):
      add(cls.__name__, v, cls.transcribe_value(v))
  for cls in (Float64BE, Float64LE):
    for f in float_values(rnd):
      add(cls.__name__, float_bits(f), cls.transcribe_value(f))
  for f in float_values(rnd):
    add('BSSFloat', float_bits(f), BSSFloat.transcribe_value(f))
  for v in int_values(0, 2**64 - 1, rnd):
    add('BSUInt', v, BSUInt.transcribe_value(v))
  for data in (b'', b'\0', b'A', bytes(range(256)), b'x' * 127, b'y' * 128, b'z' * 300):
    add('BSData', data.hex(), b''.join(BSData.transcribe_value(data)))
  texts = ('', 'A', 'żółw', 'turtle 🐢', 'a' * 127, 'é' * 64, 'line\nbreak')
  for text in texts:
    add('BSString', text, BSString.transcribe_value(text))
  for text in texts:
    add('BinaryUTF8NUL', text, b''.join(BinaryUTF8NUL.transcribe_value(text)))
  lists = (
      ('Int32LE', [], Int32LE),
      ('Int32LE', [-2**31, -1, 0, 1, 2**31 - 1], Int32LE),
      ('UInt16BE', list(range(0, 65536, 509)), UInt16BE),
      ('BSString', ['', 'a', 'żółw'], BSString),
      ('UInt8', [0, 1, 255], UInt8),
  )
  for item, values, cls in lists:
    _, transcribe = counted_list(cls)
    wire = b''.join(
        bytes(chunk) if isinstance(chunk, (bytes, bytearray)) else b''.join(chunk)
        for chunk in transcribe(values)
    )
    add(f'list:{item}', values, wire)

  records = []
  for fields in (
      dict(
          id=0, kind=0, offset=0, delta=0, stamp=0, temperature=0.0, ratio=0.0,
          name='', label='', blob=b'', count=0, samples=[]
      ),
      dict(
          id=2**32 - 1, kind=255, offset=-2**15, delta=2**31 - 1,
          stamp=2**64 - 1, temperature=-273.15, ratio=1e-05, name='żółw 🐢',
          label='label', blob=bytes(range(200)), count=2**63, samples=[-1, 0, 1]
      ),
  ):
    rec = Record(**fields)
    value = dict(fields)
    value['temperature'] = float_bits(value['temperature'])
    value['ratio'] = float_bits(value['ratio'])
    value['blob'] = value['blob'].hex()
    records.append(dict(type='Record', value=value, wire=bytes(rec).hex()))

  # One vector to a line, so that a change shows as a short diff.
  print('{')
  print(f'"generator": {json.dumps("python/binary_vectors.py, cs.binary 20240630")},')
  for key, items in (('vectors', out), ('records', records)):
    print(f'"{key}": [')
    print(',\n'.join(json.dumps(item, ensure_ascii=False) for item in items))
    print(']' + (',' if key == 'vectors' else ''))
  print('}')
  return 0

if __name__ == '__main__':
  sys.exit(main())
