// Unit tests: ts-jest compiles src/ (tsconfig.test.json); jsdom gives the DOM the panel and
// ServerConnection need. The environment adds Node's fetch classes, which jsdom lacks (see jest-env.js).
module.exports = {
  testEnvironment: '<rootDir>/jest-env.js',
  testRegex: 'src/__tests__/.*\\.spec\\.ts$',
  transform: {
    '^.+\\.ts$': ['ts-jest', { tsconfig: 'tsconfig.test.json' }]
  },
  moduleFileExtensions: ['ts', 'js', 'json'],
  collectCoverageFrom: ['src/**/*.ts', '!src/**/*.d.ts', '!src/__tests__/**']
};
