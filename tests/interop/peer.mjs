// A Yjs peer (yjs + y-protocols) driven over stdin/stdout, for crdtswarm's interop tests.
//
// Usage: node peer.mjs [clientID]
//
// Lock-step: every request is one JSON line on stdin, every response one JSON line on
// stdout. Binary data travels as base64. A response is
//   {"messages": [base64 y-protocols message, ...], "result": ...}
// or {"error": "..."}; "messages" holds what the peer wants to send: the replies to a
// received message and the Update messages of its own edits, in order.
//
// Requests ({"op": ...}):
//   start                       queue sync step 1
//   receive   data              handle one y-protocols message (sync or awareness)
//   edit      edits             make local edits in one transaction (see applyEdit)
//   state                       result: {json, stateVector, update}
//   apply_update  update        Y.applyUpdate a raw update (no y-protocols framing)
//   set_awareness state         set the local awareness state; queue an awareness message
//   awareness                   result: {clientID: state} of every known client
//
// The document has a Y.Map "map", a Y.Text "text" and a Y.Array "array".

import { createInterface } from 'node:readline'
import * as Y from 'yjs'
import * as syncProtocol from 'y-protocols/sync'
import * as awarenessProtocol from 'y-protocols/awareness'
import * as encoding from 'lib0/encoding'
import * as decoding from 'lib0/decoding'

const REMOTE = 'remote'
const MESSAGE_SYNC = 0
const MESSAGE_AWARENESS = 1

const doc = new Y.Doc()
if (process.argv[2] !== undefined) doc.clientID = Number(process.argv[2])
const map = doc.getMap('map')
const text = doc.getText('text')
const array = doc.getArray('array')
const awareness = new awarenessProtocol.Awareness(doc)
awareness.setLocalState(null)

let outbox = []

doc.on('update', (update, origin) => {
  if (origin === REMOTE) return // no echo: the peer sent it
  const encoder = encoding.createEncoder()
  encoding.writeVarUint(encoder, MESSAGE_SYNC)
  syncProtocol.writeUpdate(encoder, update)
  outbox.push(encoding.toUint8Array(encoder))
})

const toBase64 = (bytes) => Buffer.from(bytes).toString('base64')
const fromBase64 = (text) => new Uint8Array(Buffer.from(text, 'base64'))

function applyEdit (edit) {
  switch (edit.kind) {
    case 'map_set': map.set(edit.key, edit.value); break
    case 'map_delete': map.delete(edit.key); break
    case 'nested_map': map.set(edit.key, new Y.Map(Object.entries(edit.entries))); break
    case 'nested_set': map.get(edit.key).set(edit.subkey, edit.value); break
    case 'text_insert': text.insert(edit.index < 0 ? text.length : edit.index, edit.text); break
    case 'text_delete': text.delete(edit.index, edit.length); break
    case 'array_push': array.push(edit.values); break
    case 'array_insert': array.insert(edit.index, edit.values); break
    case 'array_delete': array.delete(edit.index, edit.length); break
    default: throw new Error(`unknown edit ${edit.kind}`)
  }
}

function receive (data) {
  const decoder = decoding.createDecoder(data)
  const encoder = encoding.createEncoder()
  const kind = decoding.readVarUint(decoder)
  if (kind === MESSAGE_SYNC) {
    encoding.writeVarUint(encoder, MESSAGE_SYNC)
    let failure = null
    syncProtocol.readSyncMessage(decoder, encoder, doc, REMOTE, (error) => { failure = error })
    if (failure !== null) throw failure
    if (encoding.length(encoder) > 1) outbox.push(encoding.toUint8Array(encoder))
  } else if (kind === MESSAGE_AWARENESS) {
    awarenessProtocol.applyAwarenessUpdate(awareness, decoding.readVarUint8Array(decoder), REMOTE)
  } else {
    throw new Error(`unknown message type ${kind}`)
  }
  if (decoding.hasContent(decoder)) throw new Error('trailing bytes')
}

function handle (request) {
  switch (request.op) {
    case 'start': {
      const encoder = encoding.createEncoder()
      encoding.writeVarUint(encoder, MESSAGE_SYNC)
      syncProtocol.writeSyncStep1(encoder, doc)
      outbox.push(encoding.toUint8Array(encoder))
      return null
    }
    case 'receive': receive(fromBase64(request.data)); return null
    case 'edit': doc.transact(() => request.edits.forEach(applyEdit)); return null
    case 'state': return {
      json: { map: map.toJSON(), text: text.toString(), array: array.toJSON() },
      stateVector: toBase64(Y.encodeStateVector(doc)),
      update: toBase64(Y.encodeStateAsUpdate(doc))
    }
    case 'apply_update': Y.applyUpdate(doc, fromBase64(request.update), REMOTE); return null
    case 'set_awareness': {
      awareness.setLocalState(request.state)
      const encoder = encoding.createEncoder()
      encoding.writeVarUint(encoder, MESSAGE_AWARENESS)
      encoding.writeVarUint8Array(
        encoder, awarenessProtocol.encodeAwarenessUpdate(awareness, [doc.clientID]))
      outbox.push(encoding.toUint8Array(encoder))
      return null
    }
    case 'awareness': return Object.fromEntries(awareness.getStates())
    default: throw new Error(`unknown op ${request.op}`)
  }
}

const lines = createInterface({ input: process.stdin, crlfDelay: Infinity })
for await (const line of lines) {
  let response
  try {
    const result = handle(JSON.parse(line))
    response = { messages: outbox.map(toBase64), result }
  } catch (error) {
    response = { error: String(error && error.stack ? error.stack : error) }
  }
  outbox = []
  process.stdout.write(JSON.stringify(response) + '\n')
}
awareness.destroy()
doc.destroy()
