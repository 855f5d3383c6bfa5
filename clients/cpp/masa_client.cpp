// masa-rt C++ client: protocol v1 over ZeroMQ (libzmq C API) and msgpack-c (C API).
// Only the C APIs are used so the library builds against the plain Debian packages
// (libzmq3-dev, libmsgpack-dev / libmsgpack-c-dev) without cppzmq or Boost.
#include "masa_client.hpp"

#include <msgpack.h>
#include <zmq.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>

namespace masa {

namespace {

constexpr double kRehelloInterval = 0.25;  // s; one resume hello per burst of errors
constexpr double kMaxTimeout = 1e6;        // s (11.6 days); 1e9 ms still fits a 32-bit long

// A timeout in seconds made safe: NaN or <= 0 -> 0 (do not wait), huge ones capped.
double sane_timeout(double s) { return s > 0 ? std::min(s, kMaxTimeout) : 0.0; }

// The same as zmq_poll milliseconds, rounded up so a short wait never becomes no wait.
long to_ms(double s) { return static_cast<long>(std::ceil(sane_timeout(s) * 1000.0)); }

// zmq_poll on one item, retried with the time left when a signal interrupts it.
// Returns > 0 if ready, 0 on timeout, -1 on another error (zmq_errno() says which).
int poll_one(zmq_pollitem_t* item, double timeout_s) {
  const double deadline = local_clock() + sane_timeout(timeout_s);
  for (;;) {
    const int rc = zmq_poll(item, 1, to_ms(deadline - local_clock()));
    if (rc >= 0 || zmq_errno() != EINTR) return rc;
  }
}

[[noreturn]] void throw_zmq(const char* call) {
  throw Error(std::string(call) + " failed: " + zmq_strerror(zmq_errno()));
}

// ------------------------------------------------------------------ packing

// A msgpack writer into a reusable buffer; every message is one map.
class Packer {
 public:
  Packer() {
    msgpack_sbuffer_init(&buf_);
    msgpack_packer_init(&pk_, &buf_, msgpack_sbuffer_write);
  }
  ~Packer() { msgpack_sbuffer_destroy(&buf_); }
  Packer(const Packer&) = delete;
  Packer& operator=(const Packer&) = delete;

  // Starts a message: {v, type, ...n_fields more}.
  Packer& message(const char* type, size_t n_fields) {
    msgpack_pack_map(&pk_, n_fields + 2);
    key("v").integer(kProtocolVersion);
    return key("type").str(type);
  }
  Packer& key(const char* k) { return str(k); }
  Packer& str(const std::string& s) {
    msgpack_pack_str_with_body(&pk_, s.data(), s.size());
    return *this;
  }
  Packer& integer(int64_t x) {
    msgpack_pack_int64(&pk_, x);
    return *this;
  }
  Packer& number(double x) {
    msgpack_pack_double(&pk_, x);
    return *this;
  }
  Packer& boolean(bool b) {
    b ? msgpack_pack_true(&pk_) : msgpack_pack_false(&pk_);
    return *this;
  }
  Packer& nil() {
    msgpack_pack_nil(&pk_);
    return *this;
  }
  Packer& map(size_t n) {
    msgpack_pack_map(&pk_, n);
    return *this;
  }
  Packer& array(size_t n) {
    msgpack_pack_array(&pk_, n);
    return *this;
  }
  Packer& bin(const void* data, size_t n) {
    msgpack_pack_bin_with_body(&pk_, data, n);
    return *this;
  }
  std::string bytes() const { return std::string(buf_.data, buf_.size); }

 private:
  msgpack_sbuffer buf_;
  msgpack_packer pk_;
};

// ------------------------------------------------------------------ reading

// Field lookup in a decoded map; a missing field or wrong type reads as a default, and
// the caller checks the fields that matter (the server is validated by Python tests).
const msgpack_object* field(const msgpack_object& map, const char* name) {
  if (map.type != MSGPACK_OBJECT_MAP) return nullptr;
  const size_t len = std::strlen(name);
  for (uint32_t i = 0; i < map.via.map.size; ++i) {
    const msgpack_object& k = map.via.map.ptr[i].key;
    if (k.type == MSGPACK_OBJECT_STR && k.via.str.size == len &&
        std::memcmp(k.via.str.ptr, name, len) == 0)
      return &map.via.map.ptr[i].val;
  }
  return nullptr;
}

bool is_number(const msgpack_object* o) {
  return o && (o->type == MSGPACK_OBJECT_POSITIVE_INTEGER ||
               o->type == MSGPACK_OBJECT_NEGATIVE_INTEGER ||
               o->type == MSGPACK_OBJECT_FLOAT32 || o->type == MSGPACK_OBJECT_FLOAT64);
}

double num(const msgpack_object& map, const char* name, double fallback = 0.0) {
  const msgpack_object* o = field(map, name);
  if (!is_number(o)) return fallback;
  switch (o->type) {
    case MSGPACK_OBJECT_POSITIVE_INTEGER: return static_cast<double>(o->via.u64);
    case MSGPACK_OBJECT_NEGATIVE_INTEGER: return static_cast<double>(o->via.i64);
    default: return o->via.f64;
  }
}

int64_t integer(const msgpack_object& map, const char* name, int64_t fallback = 0) {
  const msgpack_object* o = field(map, name);
  if (o && o->type == MSGPACK_OBJECT_POSITIVE_INTEGER)
    return static_cast<int64_t>(o->via.u64);
  if (o && o->type == MSGPACK_OBJECT_NEGATIVE_INTEGER) return o->via.i64;
  return fallback;
}

std::string text(const msgpack_object& o) {
  return o.type == MSGPACK_OBJECT_STR ? std::string(o.via.str.ptr, o.via.str.size) : "";
}

std::string text(const msgpack_object& map, const char* name) {
  const msgpack_object* o = field(map, name);
  return o ? text(*o) : "";
}

bool boolean(const msgpack_object& map, const char* name) {
  const msgpack_object* o = field(map, name);
  return o && o->type == MSGPACK_OBJECT_BOOLEAN && o->via.boolean;
}

Welcome read_welcome(const msgpack_object& m) {
  Welcome w;
  w.session = text(m, "session");
  w.model = text(m, "model");
  w.layout = text(m, "layout");
  w.server_time = num(m, "server_time");
  w.fps = num(m, "fps");
  w.window = static_cast<int>(integer(m, "window"));
  w.last_seq = integer(m, "last_seq", -1);
  w.resumed = boolean(m, "resumed");
  w.lookahead_s = num(m, "lookahead_s");  // absent (older servers): 0
  const msgpack_object* refs = field(m, "references");
  if (refs && refs->type == MSGPACK_OBJECT_ARRAY)
    for (uint32_t i = 0; i < refs->via.array.size; ++i)
      w.references.push_back(text(refs->via.array.ptr[i]));
  const msgpack_object* shape = field(m, "shape");
  if (shape && shape->type == MSGPACK_OBJECT_ARRAY && shape->via.array.size == 2 &&
      shape->via.array.ptr[0].type == MSGPACK_OBJECT_POSITIVE_INTEGER &&
      shape->via.array.ptr[1].type == MSGPACK_OBJECT_POSITIVE_INTEGER) {
    w.joints = static_cast<int>(shape->via.array.ptr[0].via.u64);
    w.dims = static_cast<int>(shape->via.array.ptr[1].via.u64);
  }
  return w;
}

Estimate read_estimate(const msgpack_object& m, double t_received) {
  Estimate e;
  e.session = text(m, "session");
  e.seq = static_cast<uint64_t>(integer(m, "seq"));
  e.t_capture = num(m, "t_capture");
  e.t_server_recv = num(m, "t_server_recv");
  e.t_server_send = num(m, "t_server_send");
  e.phase_id = static_cast<int>(integer(m, "phase_id", -1));
  e.phase_name = text(m, "phase_name");
  e.phase_progress = num(m, "phase_progress");
  e.progress = num(m, "progress");
  e.confidence = num(m, "confidence");
  e.state = text(m, "state");
  e.activity = text(m, "activity");
  e.t_received = t_received;
  return e;
}

std::string random_session() {
  std::random_device rd;
  std::mt19937_64 gen((static_cast<uint64_t>(rd()) << 32) ^ rd());
  static const char* hex = "0123456789abcdef";
  std::string s(32, '0');
  for (char& c : s) c = hex[gen() & 15];
  return s;
}

// Little-endian float32 bytes whatever the host order: the wire dtype is '<f4'.
void to_little_endian(const float* src, size_t n, std::vector<unsigned char>* out) {
  out->resize(n * 4);
  for (size_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &src[i], 4);
    for (int b = 0; b < 4; ++b) (*out)[i * 4 + b] = static_cast<unsigned char>(bits >> (8 * b));
  }
}

}  // namespace

double local_clock() {
  using namespace std::chrono;
  return duration<double>(steady_clock::now().time_since_epoch()).count();
}

ServerError::ServerError(std::string reason, const std::string& detail)
    : Error("server refused: " + reason + (detail.empty() ? "" : " (" + detail + ")")),
      reason_(std::move(reason)) {}

// ------------------------------------------------------------------ PoseOutlet

PoseOutlet::PoseOutlet(OutletOptions options) : options_(std::move(options)) {
  if (options_.session.empty()) options_.session = random_session();
}

PoseOutlet::~PoseOutlet() { close(); }

const Welcome& PoseOutlet::open(double timeout_s, bool resume) {
  timeout_s = sane_timeout(timeout_s);
  if (!sock_) {
    try {
      if (!(ctx_ = zmq_ctx_new())) throw_zmq("zmq_ctx_new");
      if (!(sock_ = zmq_socket(ctx_, ZMQ_DEALER))) throw_zmq("zmq_socket(ZMQ_DEALER)");
      const int64_t maxmsg = kMaxMessageBytes;
      const int one = 1, linger_ms = 100;
      if (zmq_setsockopt(sock_, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg) != 0)
        throw_zmq("zmq_setsockopt(ZMQ_MAXMSGSIZE)");
      if (zmq_setsockopt(sock_, ZMQ_LINGER, &linger_ms, sizeof linger_ms) != 0)
        throw_zmq("zmq_setsockopt(ZMQ_LINGER)");
      // No queueing towards a link that is not up: those frames would arrive stale.
      if (zmq_setsockopt(sock_, ZMQ_IMMEDIATE, &one, sizeof one) != 0)
        throw_zmq("zmq_setsockopt(ZMQ_IMMEDIATE)");
      if (zmq_setsockopt(sock_, ZMQ_SNDHWM, &options_.sndhwm, sizeof options_.sndhwm) != 0)
        throw_zmq("zmq_setsockopt(ZMQ_SNDHWM)");
      if (options_.sndbuf > 0 &&
          zmq_setsockopt(sock_, ZMQ_SNDBUF, &options_.sndbuf, sizeof options_.sndbuf) != 0)
        throw_zmq("zmq_setsockopt(ZMQ_SNDBUF)");
    } catch (...) {
      close();
      throw;
    }
    if (zmq_connect(sock_, options_.address.c_str()) != 0) {
      const std::string why = zmq_strerror(zmq_errno());
      close();
      throw Error("cannot connect to " + options_.address + ": " + why);
    }
  }
  const double deadline = local_clock() + timeout_s;
  zmq_pollitem_t item{sock_, 0, ZMQ_POLLOUT, 0};
  const int ready = poll_one(&item, timeout_s);
  if (ready <= 0) {
    const std::string why = ready < 0 ? std::string(": ") + zmq_strerror(zmq_errno()) : "";
    close();
    throw ConnectionLost("no server at " + options_.address + why);
  }
  send_hello(resume);
  bool got_welcome = false;
  try {
    while (!got_welcome) {
      const double left = deadline - local_clock();
      if (left <= 0 || !wait_readable(left))
        throw ConnectionLost("no welcome from " + options_.address);
      std::optional<Estimate> ignored;  // estimates cannot arrive before the welcome
      receive_one(&ignored, &got_welcome);
    }
  } catch (...) {
    close();
    throw;
  }
  open_ = true;
  return welcome_;
}

void PoseOutlet::close() {
  if (sock_) {
    if (open_) {
      Packer p;
      p.message("bye", 1).key("session").str(options_.session);
      send(p.bytes());
    }
    zmq_close(sock_);
  }
  if (ctx_)
    while (zmq_ctx_term(ctx_) != 0 && zmq_errno() == EINTR) {
    }
  sock_ = ctx_ = nullptr;
  open_ = false;
}

std::optional<uint64_t> PoseOutlet::push(const float* joints, int J, int C,
                                         std::optional<double> stamp) {
  if (!open_) throw Error("outlet is not open: call open() first");
  if (J != welcome_.joints || C != welcome_.dims)
    throw std::invalid_argument("joints shape (" + std::to_string(J) + ", " + std::to_string(C) +
                                ") is not the server's (" + std::to_string(welcome_.joints) +
                                ", " + std::to_string(welcome_.dims) + ")");
  if (!joints) throw std::invalid_argument("joints is a null pointer");
  const size_t n = static_cast<size_t>(J) * C;
  for (size_t i = 0; i < n; ++i)
    if (std::isinf(joints[i]))
      throw std::invalid_argument("joints[" + std::to_string(i) +
                                  "] is infinite (use NaN for a missing joint)");
  if (stamp && !std::isfinite(*stamp))
    throw std::invalid_argument("stamp is not finite");
  const double now = local_clock();
  const double t = (!stamp || *stamp < 0) ? now : *stamp;  // < 0: now (deprecated)
  if (!(t > last_stamp_)) {
    char buf[160];
    std::snprintf(buf, sizeof buf,
                  "stamp %.9g is not after the previous frame's %.9g (capture stamps must "
                  "increase strictly, in the local_clock() timebase)", t, last_stamp_);
    throw std::invalid_argument(buf);
  }
  // Replies already queued first, never waiting: a resume's welcome moves next_seq_ on,
  // and an unknown_session error (the session expired) must reach an app that never pulls.
  take_queued_replies();
  heartbeat(now);
  to_little_endian(joints, n, &scratch_);
  last_stamp_ = t;
  const uint64_t seq = next_seq_++;  // a dropped frame keeps its number: the gap shows it
  Packer p;
  p.message("frame", 4).key("session").str(options_.session);
  p.key("seq").integer(static_cast<int64_t>(seq));
  p.key("t").number(t);
  p.key("joints").map(3).key("dtype").str("<f4");
  p.key("shape").array(2).integer(J).integer(C);
  p.key("data").bin(scratch_.data(), scratch_.size());
  if (!send(p.bytes())) {
    ++dropped_;
    return std::nullopt;
  }
  ++sent_;
  return seq;
}

std::optional<Estimate> PoseOutlet::pull(double timeout_s) {
  if (!open_) throw Error("outlet is not open: call open() first");
  const double deadline = local_clock() + sane_timeout(timeout_s);
  const double slice = options_.lost_after / 4.0;
  if (!pending_.empty()) {  // read by push() before
    Estimate first = std::move(pending_.front());
    pending_.pop_front();
    return first;
  }
  for (;;) {
    heartbeat(local_clock());
    // Everything already queued first (estimates, pongs): it may prove the server alive.
    std::optional<Estimate> est;
    while (receive_one(&est, nullptr))
      if (est) return est;
    const double now = local_clock();
    if (unanswered_since_ >= 0 && now - unanswered_since_ > options_.lost_after) {
      unanswered_since_ = -1.0;  // the next call starts a fresh deadline
      throw ConnectionLost("no answer from " + options_.address);
    }
    const double left = deadline - now;
    if (left <= 0) return std::nullopt;
    wait_readable(std::min(left, slice));
  }
}

// ------------------------------------------------------------------ internals

bool PoseOutlet::send(const std::string& bytes) {
  return zmq_send(sock_, bytes.data(), bytes.size(), ZMQ_DONTWAIT) >= 0;
}

void PoseOutlet::take_queued_replies() {
  std::optional<Estimate> est;
  while (receive_one(&est, nullptr)) {
    if (!est) continue;
    if (pending_.size() == kMaxPending) {  // nobody pulls: the oldest goes, counted
      pending_.pop_front();
      ++estimates_discarded_;
    }
    pending_.push_back(std::move(*est));
  }
}

void PoseOutlet::send_hello(bool resume) {
  hello_sent_at_ = local_clock();
  Packer p;
  p.message("hello", 7).key("session").str(options_.session);
  p.key("layout").str(options_.layout);
  p.key("fps").number(options_.fps);
  p.key("reference");
  options_.reference.empty() ? p.nil() : p.str(options_.reference);
  p.key("client_time").number(hello_sent_at_);
  p.key("resume").boolean(resume);
  p.key("client").str("masa-rt-cpp/1");
  // A lost resume hello (the link not writable yet) would leave the session unknown to
  // the server: heartbeat() sends it again.
  resume_due_ = !send(p.bytes()) && resume;
}

void PoseOutlet::heartbeat(double now) {
  if (resume_due_ && open_) send_hello(true);
  if (now - last_ping_ < options_.lost_after / 4.0) return;
  last_ping_ = now;
  if (unanswered_since_ < 0) unanswered_since_ = now;
  Packer p;
  p.message("ping", 2).key("client_time").number(now);
  p.key("session").str(options_.session);
  send(p.bytes());
}

bool PoseOutlet::wait_readable(double timeout_s) {
  zmq_pollitem_t item{sock_, 0, ZMQ_POLLIN, 0};
  return poll_one(&item, timeout_s) > 0;
}

bool PoseOutlet::receive_one(std::optional<Estimate>* est, bool* got_welcome) {
  est->reset();
  zmq_msg_t msg;
  zmq_msg_init(&msg);
  if (zmq_msg_recv(&msg, sock_, ZMQ_DONTWAIT) < 0) {
    zmq_msg_close(&msg);
    return false;
  }
  const double t_received = local_clock();
  msgpack_unpacked up;
  msgpack_unpacked_init(&up);
  size_t off = 0;
  const auto rc = msgpack_unpack_next(&up, static_cast<const char*>(zmq_msg_data(&msg)),
                                      zmq_msg_size(&msg), &off);
  const msgpack_object& m = up.data;
  const std::string type = text(m, "type");
  if (rc != MSGPACK_UNPACK_SUCCESS || integer(m, "v", -1) != kProtocolVersion || type.empty()) {
    ++malformed_;
  } else {
    unanswered_since_ = -1.0;  // anything valid from the server proves it alive
    if (type == "estimate" && text(m, "session") == options_.session) {
      *est = read_estimate(m, t_received);
    } else if (type == "welcome") {
      welcome_ = read_welcome(m);
      if (welcome_.last_seq + 1 > static_cast<int64_t>(next_seq_))
        next_seq_ = static_cast<uint64_t>(welcome_.last_seq + 1);
      if (got_welcome) *got_welcome = true;
    } else if (type == "error") {
      const msgpack_object* seq = field(m, "seq");
      const bool has_seq = seq && seq->type == MSGPACK_OBJECT_POSITIVE_INTEGER;
      const std::string reason = text(m, "reason"), detail = text(m, "detail");
      msgpack_unpacked_destroy(&up);
      zmq_msg_close(&msg);
      on_error(reason, detail, has_seq);  // may throw: buffers are released first
      return true;
    }
  }
  msgpack_unpacked_destroy(&up);
  zmq_msg_close(&msg);
  return true;
}

void PoseOutlet::on_error(const std::string& reason, const std::string& detail, bool has_seq) {
  if (has_seq) {  // about one frame: count it, the stream goes on
    ++rejected_[reason];
  } else if (reason == "unknown_session" && open_) {
    // The server restarted or expired the session: resume (it re-creates it).
    if (local_clock() - hello_sent_at_ > kRehelloInterval) send_hello(true);
  } else {
    throw ServerError(reason, detail);
  }
}

}  // namespace masa
