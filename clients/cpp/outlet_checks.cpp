// Checks of PoseOutlet's local input validation, pull() and timeouts, run against a
// test server by tests/test_cpp_client.py:
//
//   masa_outlet_checks LIVE_ADDRESS DEAD_ADDRESS
//
// Prints "ok <check>" per passed check and exits 0, or prints "FAIL <check>" and exits 1.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "masa_client.hpp"

namespace {

int failures = 0;

void check(bool ok, const char* what) {
  std::printf("%s %s\n", ok ? "ok" : "FAIL", what);
  if (!ok) ++failures;
}

template <class F>
bool throws_invalid_argument(F&& f) {
  try {
    f();
  } catch (const std::invalid_argument&) {
    return true;
  }
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s LIVE_ADDRESS DEAD_ADDRESS\n", argv[0]);
    return 2;
  }
  std::setvbuf(stdout, nullptr, _IONBF, 0);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  try {
    masa::OutletOptions o;
    o.address = argv[1];
    o.session = "cpp-checks";
    masa::PoseOutlet out(o);
    out.open(1e300);  // huge timeout: capped, not undefined behaviour
    check(true, "open(1e300)");
    std::vector<float> j(42 * 3, 0.5f), inf = j;
    inf[5] = std::numeric_limits<float>::infinity();

    // 1. Bad frames are refused locally, before using a seq.
    const auto s0 = out.push(j.data(), 42, 3);
    check(s0 && *s0 == 0, "first frame gets seq 0");
    check(throws_invalid_argument([&] { out.push(j.data(), 42, 3, masa::local_clock() - 10); }),
          "earlier stamp throws");
    check(throws_invalid_argument([&] { out.push(j.data(), 42, 3, nan); }), "NaN stamp throws");
    check(throws_invalid_argument([&] { out.push(inf.data(), 42, 3); }), "inf joint throws");
    check(throws_invalid_argument([&] { out.push(nullptr, 42, 3); }), "null joints throws");
    std::vector<float> missing = j;
    missing[7] = std::nanf("");  // NaN = missing joint: allowed
    const auto s1 = out.push(missing.data(), 42, 3);
    check(s1 && *s1 == 1, "next good frame gets seq 1");
    const double t2 = masa::local_clock();
    const auto s2 = out.push(j.data(), 42, 3, t2);
    check(s2 && *s2 == 2, "explicit stamp accepted");
    check(throws_invalid_argument([&] { out.push(j.data(), 42, 3, t2); }), "equal stamp throws");
    const auto s3 = out.push(j.data(), 42, 3, -1.0);  // deprecated: negative = now
    check(s3 && *s3 == 3, "negative stamp still means now");
    std::set<uint64_t> answered;
    const double end = masa::local_clock() + 2.0;
    while (answered.size() < 4 && masa::local_clock() < end)
      if (auto e = out.pull(0.1)) answered.insert(e->seq);
    check(answered == std::set<uint64_t>({0, 1, 2, 3}), "frames after a refusal answered");
    check(out.rejected().empty(), "server rejected nothing");

    // 3. Timeouts: NaN / negative do not wait.
    double t0 = masa::local_clock();
    out.pull(nan);
    check(masa::local_clock() - t0 < 0.5, "pull(NaN) returns at once");
    out.close();

    // 4. An app that only pushes resumes a session the server forgot (as after expiry):
    //    a second outlet with the same id says bye, which ends it on the server.
    o.session = "cpp-push-only";
    masa::PoseOutlet pusher(o);
    pusher.open();
    pusher.push(j.data(), 42, 3);
    bool first_answered = false;
    for (const double until = masa::local_clock() + 2.0;
         !first_answered && masa::local_clock() < until;)
      first_answered = pusher.pull(0.1).has_value();
    {
      masa::PoseOutlet twin(o);
      twin.open(5.0, /*resume=*/true);
    }  // bye: the server forgets "cpp-push-only"
    for (t0 = masa::local_clock(); masa::local_clock() - t0 < 1.0;) {
      pusher.push(j.data(), 42, 3);
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    bool resumed = false;  // an estimate for a frame pushed after the server forgot us
    for (const double until = masa::local_clock() + 0.3; masa::local_clock() < until;)
      if (pusher.pull(0.05)) resumed = true;
    check(first_answered && resumed, "push-only outlet resumes a session the server ended");
    pusher.close();

    // 2. Replies already queued are read before the liveness check.
    o.session = "cpp-checks-lost";
    o.lost_after = 0.4;
    masa::PoseOutlet quiet(o);
    quiet.open();
    for (t0 = masa::local_clock(); masa::local_clock() - t0 < 0.7;) {
      quiet.push(j.data(), 42, 3);
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));  // let the answers land
    bool got = false;
    try {
      got = quiet.pull(0.0).has_value();
    } catch (const masa::ConnectionLost&) {
    }
    check(got, "pull(0) after a quiet spell returns a queued estimate");
    quiet.close();

    o.address = argv[2];
    masa::PoseOutlet dead(o);
    t0 = masa::local_clock();
    bool lost = false;
    try {
      dead.open(-1.0);
    } catch (const masa::ConnectionLost&) {
      lost = true;
    }
    check(lost && masa::local_clock() - t0 < 1.0, "open(-1) fails at once");
  } catch (const std::exception& e) {
    std::printf("FAIL unexpected exception: %s\n", e.what());
    return 1;
  }
  std::printf(failures ? "%d checks failed\n" : "all checks passed\n", failures);
  return failures ? 1 : 0;
}
