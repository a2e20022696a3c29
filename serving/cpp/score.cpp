// pimm_score: the serving contract of model.pt exercised from C++ (libtorch only: no Python, no torchrec).
//
//   pimm_score MODEL.pt INPUT.csv [--threads N]
//
// INPUT.csv: one row per line, F comma-separated raw int64 values in the order of model.json's `fields`
// (string-valued fields: their int64 string key, see docs/serving.md); an empty cell is a missing value. An optional
// first line naming the fields (it must equal the model's field order) and lines starting with '#' are skipped.
// Output (stdout): a header line with the task names, then one line per input row with the probability of each
// task ("%.9g"), in chain order. Exit status 2 on bad input, 1 if the model fails to load or run.
#include <ATen/Parallel.h>
#include <torch/script.h>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

std::string trim(const std::string& s) {
  const char* ws = " \t\r";
  size_t b = s.find_first_not_of(ws);
  if (b == std::string::npos) return "";
  size_t e = s.find_last_not_of(ws);
  return s.substr(b, e - b + 1);
}

std::vector<std::string> split(const std::string& line) {
  std::vector<std::string> cells;
  std::stringstream ss(line);
  std::string cell;
  while (std::getline(ss, cell, ',')) cells.push_back(trim(cell));
  if (!line.empty() && line.back() == ',') cells.push_back("");
  return cells;
}

bool parse_int64(const std::string& s, int64_t* out) {
  if (s.empty()) return false;
  try {
    size_t used = 0;
    long long v = std::stoll(s, &used, 10);
    if (used != s.size()) return false;
    *out = static_cast<int64_t>(v);
    return true;
  } catch (const std::exception&) {
    return false;
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3 && !(argc == 5 && std::string(argv[3]) == "--threads")) {
    std::cerr << "usage: " << argv[0] << " MODEL.pt INPUT.csv [--threads N]\n";
    return 2;
  }
  if (argc == 5) at::set_num_threads(std::stoi(argv[4]));

  torch::jit::script::Module model;
  try {
    model = torch::jit::load(argv[1]);
  } catch (const c10::Error& e) {
    std::cerr << "cannot load " << argv[1] << ": " << e.what_without_backtrace() << "\n";
    return 1;
  }
  model.eval();
  const int64_t num_fields = model.attr("num_fields").toInt();
  std::vector<std::string> fields, tasks;
  for (const auto& f : model.attr("field_names").toListRef()) fields.push_back(f.toStringRef());
  for (const auto& t : model.attr("tasks").toListRef()) tasks.push_back(t.toStringRef());

  std::ifstream in(argv[2]);
  if (!in) {
    std::cerr << "cannot open " << argv[2] << "\n";
    return 2;
  }
  std::vector<int64_t> raw;
  std::vector<uint8_t> missing;
  int64_t rows = 0, line_no = 0;
  bool first = true;
  std::string line;
  while (std::getline(in, line)) {
    ++line_no;
    std::string t = trim(line);
    if (t.empty() || t[0] == '#') continue;
    std::vector<std::string> cells = split(t);
    if (static_cast<int64_t>(cells.size()) != num_fields) {
      std::cerr << argv[2] << ":" << line_no << ": " << cells.size() << " values, the model takes " << num_fields
                << "\n";
      return 2;
    }
    if (first) {
      first = false;
      if (cells == fields) continue;  // a header naming the fields in the model's order
    }
    for (const auto& c : cells) {
      int64_t v = 0;
      if (c.empty()) {
        raw.push_back(0);
        missing.push_back(1);
      } else if (parse_int64(c, &v)) {
        raw.push_back(v);
        missing.push_back(0);
      } else {
        std::cerr << argv[2] << ":" << line_no << ": '" << c << "' is not an int64 (a header must name the fields "
                  << "in the model's order)\n";
        return 2;
      }
    }
    ++rows;
  }
  if (rows == 0) {
    std::cerr << argv[2] << ": no rows\n";
    return 2;
  }

  // (B, F) int64 raw values and (B, F) bool missing mask: the model's forward(raw, missing)
  torch::Tensor raw_t = torch::from_blob(raw.data(), {rows, num_fields}, torch::kInt64).clone();
  torch::Tensor missing_t = torch::from_blob(missing.data(), {rows, num_fields}, torch::kUInt8).to(torch::kBool);
  c10::IValue result;
  try {
    torch::NoGradGuard no_grad;
    result = model.forward({raw_t, missing_t});
  } catch (const c10::Error& e) {
    std::cerr << "scoring failed: " << e.what_without_backtrace() << "\n";
    return 1;
  }

  const auto out = result.toGenericDict();  // {task: (B,) probability}
  std::vector<torch::Tensor> probs;
  for (size_t i = 0; i < tasks.size(); ++i) {
    probs.push_back(out.at(tasks[i]).toTensor().to(torch::kFloat32).contiguous());
    std::cout << (i ? "," : "") << tasks[i];
  }
  std::cout << "\n";
  for (int64_t r = 0; r < rows; ++r) {
    for (size_t i = 0; i < probs.size(); ++i) {
      char buf[32];
      std::snprintf(buf, sizeof(buf), "%.9g", static_cast<double>(probs[i].data_ptr<float>()[r]));
      std::cout << (i ? "," : "") << buf;
    }
    std::cout << "\n";
  }
  return 0;
}
