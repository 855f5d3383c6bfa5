// Stream a recorded pose file to a masa-rt server in real time and print the estimates.
//
//   masa-rt export-raw examples/demos/pour_milk.npz pour.masaraw
//   masa_stream_file pour.masaraw --address tcp://127.0.0.1:5555 --rate 30
//
// The .masaraw format (clients/export_raw.py): one ASCII header line
// "MASA-RAW 1 frames=T joints=J dims=C fps=F layout=NAME", then T*J*C float32 LE.
// Exit status: 0 if every frame sent was answered or rejected with a reason, 1 otherwise.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "masa_client.hpp"

namespace {

struct RawFile {
  std::map<std::string, std::string> meta;
  int frames = 0, joints = 0, dims = 0;
  std::vector<float> data;  // (frames, joints, dims), row-major
};

RawFile read_raw(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::string line, magic, token;
  std::getline(in, line);
  std::istringstream header(line);
  int version = 0;
  header >> magic >> version;
  if (magic != "MASA-RAW" || version != 1) throw std::runtime_error(path + ": not MASA-RAW v1");
  RawFile f;
  while (header >> token) {
    const auto eq = token.find('=');
    if (eq != std::string::npos) f.meta[token.substr(0, eq)] = token.substr(eq + 1);
  }
  f.frames = std::stoi(f.meta.at("frames"));
  f.joints = std::stoi(f.meta.at("joints"));
  f.dims = std::stoi(f.meta.at("dims"));
  f.data.resize(static_cast<size_t>(f.frames) * f.joints * f.dims);
  // The file is little-endian; this example assumes a little-endian host (x86, ARM).
  in.read(reinterpret_cast<char*>(f.data.data()),
          static_cast<std::streamsize>(f.data.size() * sizeof(float)));
  if (!in) throw std::runtime_error(path + ": shorter than its header says");
  return f;
}

void print(const masa::Estimate& e) {
  std::printf("estimate seq=%llu phase=%d (%s) progress=%.3f confidence=%.2f state=%s "
              "latency_ms=%.3f\n",
              static_cast<unsigned long long>(e.seq), e.phase_id, e.phase_name.c_str(),
              e.progress, e.confidence, e.state.c_str(), e.latency() * 1e3);
}

// Pull and print estimates until `until` (client clock); returns how many arrived.
int pull_until(masa::PoseOutlet& outlet, double until) {
  int n = 0;
  for (double now = masa::local_clock(); now < until; now = masa::local_clock())
    if (auto est = outlet.pull(until - now)) {
      print(*est);
      ++n;
    }
  return n;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s FILE.masaraw [--address A] [--rate HZ] [--session S] "
                 "[--reference R]\n", argv[0]);
    return 2;
  }
  try {
    const RawFile file = read_raw(argv[1]);
    masa::OutletOptions opt;
    opt.layout = file.meta.count("layout") ? file.meta.at("layout") : opt.layout;
    opt.fps = file.meta.count("fps") ? std::stod(file.meta.at("fps")) : opt.fps;
    for (int i = 2; i + 1 < argc; i += 2) {
      const std::string flag = argv[i], value = argv[i + 1];
      if (flag == "--address") opt.address = value;
      else if (flag == "--rate") opt.fps = std::stod(value);
      else if (flag == "--session") opt.session = value;
      else if (flag == "--reference") opt.reference = value;
      else throw std::runtime_error("unknown option " + flag);
    }
    masa::PoseOutlet outlet(opt);
    const masa::Welcome& w = outlet.open();
    std::printf("welcome session=%s model=%s layout=%s shape=%dx%d lookahead_s=%.3f\n",
                w.session.c_str(), w.model.c_str(), w.layout.c_str(), w.joints, w.dims,
                w.lookahead_s);
    // Absolute schedule: frame k is due at t0 + k / fps, so pacing errors never accumulate.
    const double t0 = masa::local_clock();
    const size_t frame_size = static_cast<size_t>(file.joints) * file.dims;
    int answered = 0;
    for (int k = 0; k < file.frames; ++k) {
      answered += pull_until(outlet, t0 + k / opt.fps);
      outlet.push(&file.data[k * frame_size], file.joints, file.dims);
    }
    // Drain: wait up to 2 s for the answers still in flight.
    const double drain_end = masa::local_clock() + 2.0;
    uint64_t rejected = 0;
    auto accounted = [&] {
      rejected = 0;
      for (const auto& [reason, n] : outlet.rejected()) rejected += n;
      return answered + rejected >= outlet.sent();
    };
    while (!accounted() && masa::local_clock() < drain_end)
      answered += pull_until(outlet, std::min(drain_end, masa::local_clock() + 0.05));
    std::printf("done sent=%llu answered=%d rejected=%llu dropped=%llu\n",
                static_cast<unsigned long long>(outlet.sent()), answered,
                static_cast<unsigned long long>(rejected),
                static_cast<unsigned long long>(outlet.dropped()));
    outlet.close();
    return accounted() ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "masa_stream_file: %s\n", e.what());
    return 2;
  }
}
