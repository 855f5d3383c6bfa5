// masa-rt C++17 client: stream poses to a masa-rt server, receive per-frame estimates.
//
// The native counterpart of clients/outlet.py (PoseOutlet), for headset apps (OpenXR and
// the like). It speaks wire protocol v1 (docs/protocol.md) over a ZeroMQ DEALER socket
// with msgpack-c. Conventions follow the Python client (and pylsl): push() never blocks
// (a frame that cannot be queued is dropped and counted), pull() returns std::nullopt on
// timeout, and only a server that stops answering throws ConnectionLost.
//
//   masa::PoseOutlet outlet({"tcp://127.0.0.1:5555"});
//   outlet.open();
//   outlet.push(joints.data(), 42, 3);              // capture stamp: now
//   outlet.push(joints.data(), 42, 3, t_capture);   // or a local_clock() stamp
//   if (auto est = outlet.pull(0.01)) std::printf("%f\n", est->progress);
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace masa {

constexpr int kProtocolVersion = 1;
constexpr int kMaxMessageBytes = 64 * 1024;  // also ZMQ_MAXMSGSIZE on the socket

// Seconds on the monotonic clock (std::chrono::steady_clock, CLOCK_MONOTONIC on Linux):
// capture stamps and latencies are measured in it, like clients.clock.local_clock.
double local_clock();

// One per-frame answer from the server (see "estimate" in docs/protocol.md).
struct Estimate {
  std::string session;
  uint64_t seq = 0;
  double t_capture = 0;      // the frame's stamp, client clock
  double t_server_recv = 0;  // server clock
  double t_server_send = 0;  // server clock
  int phase_id = -1;         // -1: no phase yet
  std::string phase_name;
  double phase_progress = 0;
  double progress = 0;
  double confidence = 0;
  std::string state;
  std::string activity;
  double t_received = 0;  // client clock, when pull() got it
  // Capture -> answer received, seconds, all in the client clock.
  double latency() const { return t_received - t_capture; }
};

struct Welcome {
  std::string session, model, layout;
  std::vector<std::string> references;
  double server_time = 0, fps = 0;
  int joints = 0, dims = 0, window = 0;  // the (J, C) shape the server expects
  int64_t last_seq = -1;                 // resumed session: last frame accepted
  bool resumed = false;
  double lookahead_s = 0;  // each estimate describes the user this long before its frame
};

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The server did not answer within the deadline (not started, gone, unreachable).
class ConnectionLost : public Error {
 public:
  using Error::Error;
};

// The server refused the session; reason() is a protocol error reason ("wrong_layout"...).
class ServerError : public Error {
 public:
  ServerError(std::string reason, const std::string& detail);
  const std::string& reason() const { return reason_; }

 private:
  std::string reason_;
};

struct OutletOptions {
  std::string address = "tcp://127.0.0.1:5555";
  std::string session;    // empty: a random 32-hex-digit id
  std::string layout = "h2o_hands";
  double fps = 30.0;
  std::string reference;  // empty: let the server recognise the activity
  double lost_after = 3.0;  // s without any answer to a heartbeat -> ConnectionLost
  int sndhwm = 256;         // frames queued at most before push() drops
  // Kernel send buffer (bytes), as the Python outlet: when the server falls behind,
  // frames back up in the SNDHWM queue, where push() counts them, not in megabytes of
  // TCP buffer where they go stale unseen. 0: the OS default.
  int sndbuf = 65536;
};

class PoseOutlet {
 public:
  explicit PoseOutlet(OutletOptions options = {});
  ~PoseOutlet();
  PoseOutlet(const PoseOutlet&) = delete;
  PoseOutlet& operator=(const PoseOutlet&) = delete;

  // Connect, say hello, wait up to timeout_s (NaN or <= 0: do not wait) for the welcome.
  // Throws ServerError, ConnectionLost, or Error if ZeroMQ cannot be set up.
  const Welcome& open(double timeout_s = 5.0, bool resume = false);
  // Queue one (J, C) float32 pose (row-major, NaN = missing joint) captured at `stamp`
  // (seconds, client clock = local_clock()). No stamp (std::nullopt, the default) means
  // now. For compatibility with the former `double stamp = -1.0` API, a negative stamp
  // also means now (deprecated: pass no stamp instead).
  // Stamps must be finite and strictly increasing from frame to frame, since the server
  // refuses a frame whose capture time is not after the last one (out_of_order): push()
  // keeps the previous frame's stamp and refuses a later-or-equal one locally.
  // Returns its seq, or nullopt if dropped locally (the seq is then skipped). Never blocks.
  // Replies already queued are handled first (so an app that only pushes still resumes
  // a session the server expired); estimates among them wait for pull(). Throws
  // ServerError if the server ended the session.
  // Throws std::invalid_argument, without using a seq, if (J, C) is not the shape the
  // server asked for, joints is null or holds +-inf, or the stamp is not finite or not
  // after the previous frame's (a stamp from another clock, e.g. 1e12, would make every
  // later frame fail this check).
  std::optional<uint64_t> push(const float* joints, int J, int C,
                               std::optional<double> stamp = std::nullopt);
  // The next estimate, waiting up to timeout_s (NaN or <= 0: do not wait); nullopt on
  // timeout. Replies already queued are read before liveness is checked, so
  // ConnectionLost is thrown only when nothing from the server is waiting.
  std::optional<Estimate> pull(double timeout_s = 0.0);
  // Say bye and release the socket. Safe to call twice; the destructor calls it.
  void close();

  const std::string& session() const { return options_.session; }
  const Welcome& welcome() const { return welcome_; }
  uint64_t sent() const { return sent_; }
  uint64_t dropped() const { return dropped_; }
  uint64_t malformed() const { return malformed_; }
  // Frames the server rejected, by reason (duplicate, out_of_order, non_finite...).
  const std::map<std::string, uint64_t>& rejected() const { return rejected_; }
  // Estimates push() read that fell off its kMaxPending-deep queue unpulled (oldest first).
  uint64_t estimates_discarded() const { return estimates_discarded_; }
  static constexpr size_t kMaxPending = 10000;

 private:
  bool send(const std::string& bytes);
  void send_hello(bool resume);
  void heartbeat(double now);
  // Handle every queued reply without waiting; estimates wait in pending_ for pull().
  void take_queued_replies();
  // Read one queued reply (false: none queued); *est is set if it was an estimate for
  // this session.
  bool receive_one(std::optional<Estimate>* est, bool* got_welcome);
  void on_error(const std::string& reason, const std::string& detail, bool has_seq);
  bool wait_readable(double timeout_s);

  OutletOptions options_;
  Welcome welcome_;
  bool open_ = false;
  void* ctx_ = nullptr;
  void* sock_ = nullptr;
  uint64_t next_seq_ = 0, sent_ = 0, dropped_ = 0, malformed_ = 0;
  std::map<std::string, uint64_t> rejected_;
  double last_ping_ = -1e300, unanswered_since_ = -1.0, hello_sent_at_ = -1e300;
  double last_stamp_ = -1e300;  // capture stamp of the last frame given a seq
  std::vector<unsigned char> scratch_;  // little-endian joint bytes, reused per frame
  std::deque<Estimate> pending_;        // estimates push() read, oldest first
  uint64_t estimates_discarded_ = 0;
  bool resume_due_ = false;             // a resume hello could not be queued: resend
};

}  // namespace masa
