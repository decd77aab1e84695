#pragma once

#include <optional>
#include <string>
#include <vector>

#include "dht/clock.h"
#include "dht/contact.h"
#include "dht/dht_id.h"
#include "dht/dht_value.h"

namespace hivemind::dht {

// The three DHT RPCs as plain structs, independent of how they travel: the simulation passes them
// as they are, the ZeroMQ adapter (net_transport.h) maps them to proto/dht.proto.
//
// Every request says whether its sender is a server: only servers (nodes that accept inbound
// connections) go into routing tables. The sender's peer id is never in the request; the receiver
// takes it from the transport, which authenticated it.
struct SenderInfo {
  bool is_server = false;
  std::vector<std::string> addresses;  // where the sender listens (servers only)
};

struct PingRequest {
  SenderInfo sender;
};

struct PingResponse {
  DhtTime dht_time = 0;  // the responder's clock, to spot peers whose clocks disagree
  bool is_server = false;
};

// One write. `key` is the hash of the user's key. `raw_key` is that key itself, sent only when a
// validator must read it (a key naming its owner); receivers check that it hashes to `key`.
struct StoreItem {
  DhtId key;
  std::optional<std::string> raw_key;
  std::optional<std::string> subkey;
  TimedValue value;
  bool in_cache = false;  // a cached copy, not a replica the receiver is responsible for
};

struct StoreRequest {
  SenderInfo sender;
  std::vector<StoreItem> items;
};

// Per item, in request order: empty when stored, otherwise why not.
struct StoreResponse {
  std::vector<std::string> errors;
};

struct FindRequest {
  SenderInfo sender;
  std::vector<DhtId> keys;
};

// Per key: whatever the responder holds for it, and the servers it knows nearest to it.
struct FindResult {
  std::optional<DhtValue> value;
  std::vector<Contact> nearest;
};

struct FindResponse {
  std::vector<FindResult> results;  // one per requested key, in order
};

}  // namespace hivemind::dht
